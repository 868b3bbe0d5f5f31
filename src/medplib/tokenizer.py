"""Tokenizers: a byte-level BPE that medplib trains itself (tiny/small presets) or the LLM's own.

The BPE is trained on a corpus this module generates from medical vocabulary and the instruction
phrasings medplib uses, so the project ships no third-party text. Byte-level BPE has no unknown
token: any answer text (VQA-RAD, reports) still encodes. Training is deterministic and takes
well under a second; the result is saved with every model folder, so a saved model never
depends on retraining. With `TokenizerConfig.corpus` (a data folder), the training split's texts
join the corpus, so that the vocabulary of that data becomes whole tokens.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medplib.config import VICUNA_SYSTEM, TokenizerConfig
from medplib.data.builder import SEGMENT_QUESTION

# The tokens sample text carries are defined with the schema: data code reads them without importing the model.
from medplib.data.schema import BOX_END_TOKEN as BOX_END
from medplib.data.schema import BOX_START_TOKEN as BOX_START
from medplib.data.schema import IMAGE_TOKEN as IMAGE
from medplib.data.schema import REGION_TOKEN as REGION
from medplib.data.schema import SEG_TOKEN as SEG
from medplib.data.schema import read_jsonl
from medplib.errors import CheckpointError, ConfigError
from medplib.model import packaged

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START, IM_END = "<im_start>", "<im_end>"
# Every special token is one id; the model relies on it when it splices image/region embeddings.
EXTRA_SPECIAL = [IMAGE, IM_START, IM_END, REGION, SEG, BOX_START, BOX_END]

_MODALITIES = ["CT", "MRI", "MR", "X-ray", "PET", "endoscopy", "dermoscopy", "fundus", "ultrasound",
               "histopathology", "colonoscopy", "radiograph", "chest X-ray", "mammography"]
_STRUCTURES = [
    "liver", "spleen", "kidney", "left kidney", "right kidney", "pancreas", "stomach", "gallbladder",
    "aorta", "inferior vena cava", "esophagus", "duodenum", "colon", "bladder", "prostate", "uterus",
    "heart", "left ventricle", "right ventricle", "left atrium", "right atrium", "myocardium", "lung",
    "left lung", "right lung", "lung lobe", "rib", "vertebra", "femur", "hip", "gluteus maximus",
    "brain", "ventricle", "white matter", "gray matter", "tumor", "lesion", "nodule", "mass", "cyst",
    "polyp", "nuclei", "nucleus", "cell", "optic disc", "optic cup", "macula", "vessel", "fovea",
    "skin lesion", "melanoma", "nevus", "thyroid", "breast", "fetal head", "adrenal gland",
    "effusion", "pneumothorax", "consolidation", "opacity", "fracture", "hemorrhage", "edema",
    "infiltrate", "cardiomegaly", "atelectasis", "pneumonia", "abnormality", "bone", "muscle",
]
_WORDS = [
    "yes", "no", "left", "right", "upper", "lower", "middle", "center", "top", "bottom", "anterior",
    "posterior", "axial", "coronal", "sagittal", "plane", "image", "region", "area", "located",
    "normal", "abnormal", "present", "absent", "large", "small", "enlarged", "contrast", "with",
    "without", "how", "many", "what", "where", "which", "is", "are", "there", "this", "the", "in",
    "of", "a", "an", "and", "or", "side", "organ", "structure", "modality", "shown", "visible",
    "segment", "please", "sure", "it", "findings", "impression", "no acute cardiopulmonary",
    "the heart is normal in size", "the lungs are clear", "density", "evenly", "sparsely",
    "distributed", "high", "low", "largest", "count", "one", "two", "three", "four", "five",
]
_TEMPLATES = [
    "What is in {r}?", "What structure is shown in {r}?", SEGMENT_QUESTION,
    "Can you segment the {s} in this image?", "Where is the {s}?", "Is there a {s} in this image?",
    "It is the {s}.", "Sure, it is {seg}.", "Sure, the {s} is {seg}.", "The {s} is at {b}(120,340),(560,780){be}.",
    "This is a {m} image.", "What modality is this? {m}.", "How many {s} are there? two.",
    "Which side is the {s} on? left.", "The region shows the {s}.",
]


def _corpus() -> list[str]:
    """Deterministic training text: templates x vocabulary, plus words and numbers for boxes."""
    # The chat-template words are frequent in every training sequence: weight them so they merge.
    lines = [VICUNA_SYSTEM] + ["USER: ASSISTANT: USER: ASSISTANT:"] * 200
    for t, s, m in itertools.product(_TEMPLATES, _STRUCTURES, _MODALITIES[:4]):
        lines.append(t.format(r=REGION, s=s, target=s, m=m, seg=SEG, b=BOX_START, be=BOX_END))
    lines += _MODALITIES + _STRUCTURES + _WORDS
    lines += [" ".join(str(n) for n in range(i, i + 20)) for i in range(0, 1001, 20)]
    return lines


def data_texts(folder: str | Path) -> list[str]:
    """The conversation texts of the train split of every JSONL file in a data folder, special tokens removed."""
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        raise ConfigError(f"tokenizer.corpus: no .jsonl file in {folder}")
    lines = []
    for f in files:
        for s in read_jsonl(f):
            if s.split == "train":
                for turn in s.conversations:
                    text = turn.content
                    for special in EXTRA_SPECIAL:
                        text = text.replace(special, " ")
                    lines.append(" ".join(text.split()))
    return lines


def train_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE for the tiny/small presets (on the built-in corpus, plus the texts of
    `cfg.corpus` when set); special tokens are single ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[PAD, BOS, EOS, *EXTRA_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() + (data_texts(cfg.corpus) if cfg.corpus else []), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(EXTRA_SPECIAL), model_max_length=cfg.model_max_length,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (a model folder or the LLM's own) or the tokenizer inside a GGUF file
    (`package:file.gguf` allowed), and make sure medplib's special tokens exist as single ids. The
    caller resizes the LLM embeddings if tokens were added."""
    resolved = packaged.resolve(str(path))
    is_gguf = resolved.suffix == ".gguf"
    if not is_gguf and not resolved.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {resolved}")
    try:
        if is_gguf:
            tok = AutoTokenizer.from_pretrained(str(resolved.parent), gguf_file=resolved.name, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(resolved), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"cannot load tokenizer from {path}: {exc}") from None
    missing = [t for t in EXTRA_SPECIAL if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        # LLaMA tokenizers have no pad token; LLaVA uses unk for padding.
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def special_token_spellings(tok: PreTrainedTokenizerBase) -> dict[int, list[int]]:
    """Each added token's id -> the ids of its text as ordinary text (`<box>` -> `<`, `box`, `>`): where a
    pretrained LLM's new embedding rows start (model/medplib.py `_grow_embeddings`)."""
    return {i: tok(t.content, add_special_tokens=False, split_special_tokens=True).input_ids
            for i, t in tok.added_tokens_decoder.items()}


def build_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(cfg.path) if cfg.path else train_tokenizer(cfg)
