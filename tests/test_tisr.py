"""TISR, the report-generation plug-in (model/tisr.py): off, the model is the one it was (same weights,
same logits, nothing added); on, the query image also enters the prompt as K pseudo-words drawn from the
word-embedding space, a few steps on the builder's phantom reports lower both the report CE and the
image-report contrastive loss, the loss is a safe zero without a pair to contrast, and the plug-in
survives save/load and answers through `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medplib.api import MedPLIB
from medplib.config import MedPLIBConfig, preset
from medplib.data.builder import BuildConfig, build_samples
from medplib.data.loading import load_sample
from medplib.data.phantoms import phantom_items
from medplib.data.reports import REPORT_PROMPT
from medplib.errors import ConfigError
from medplib.processing import Encoded
from medplib.training.fit import fit
from medplib.training.recipe import LOSS_PARTS, LossSection
from medplib.training.trainable import set_trainable

K = 4
ON = {"tisr.enabled": True, "tisr.tokens": K}
# Endoscopy, dermoscopy, fundus and ultrasound phantoms have short reports: cheap steps on 2 cores.
MODALITIES = ("endoscopy", "dermoscopy", "fundus", "ultrasound")
REPORT_WEIGHTS = LossSection(ce=1.0, bce=0.0, dice=0.0, contrastive=1.0)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Six phantoms and the builder's report sample for each (`tasks=("report",)`), loaded."""
    root = tmp_path_factory.mktemp("phantom_reports")
    items = phantom_items(root, 6, seed=3, size=112, modalities=MODALITIES)
    samples = list(build_samples(items, root, BuildConfig(tasks=("report",))))
    assert {s.task for s in samples} == {"report"} and len(samples) == 6
    return root, [load_sample(s, root) for s in samples]


def _encode(m: MedPLIB, loaded: list) -> list[Encoded]:
    return [m.processor.encode_loaded(x) for x in loaded]


def _eval(m: MedPLIB, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    m.model.eval()
    with torch.no_grad():
        out = m.model(**batch)
    return out.logits, {k: float(v) for k, v in out.parts.items()}


@pytest.fixture(scope="module")
def trained(reports: tuple[Path, list]) -> dict:
    """A tiny model with TISR, before and after 12 steps on the phantom reports (CE + contrastive)."""
    m = MedPLIB.from_preset("tiny", seed=0, **ON)
    items = _encode(m, reports[1])
    batch = m.collate(items)  # all six reports: the contrastive loss sees every negative
    _, before = _eval(m, batch)
    grads: dict[str, float] = {}

    def watch(step: int, parts: dict[str, float]) -> None:  # gradients are cleared at the next step
        if step == 0:
            grads.update({n: float(p.grad.abs().sum()) for n, p in m.model.tisr.named_parameters()})

    history = fit(m, items, steps=12, batch_size=3, lr=2e-3, seed=0, loss=REPORT_WEIGHTS, on_step=watch)
    _, after = _eval(m, batch)
    return {"m": m, "items": items, "batch": batch, "before": before, "after": after, "history": history,
            "grads": grads}


def test_off_by_default_and_the_model_is_unchanged(reports: tuple[Path, list], tmp_path: Path) -> None:
    cfg = preset("tiny")
    assert not cfg.tisr.enabled and cfg.num_query_tokens == cfg.vision.num_image_tokens
    default = MedPLIB.from_preset("tiny", seed=0)
    explicit = MedPLIB.from_preset("tiny", seed=0, **{"tisr.enabled": False, "tisr.tokens": 7})
    assert default.model.tisr is None and not any(k.startswith("tisr.") for k in default.model.state_dict())
    a, b = default.model.state_dict(), explicit.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = default.collate(_encode(default, reports[1][:2]))
    assert torch.equal(batch["input_ids"], explicit.collate(_encode(explicit, reports[1][:2]))["input_ids"])
    logits, parts = _eval(default, batch)
    assert torch.equal(logits, _eval(explicit, batch)[0])
    assert set(parts) == set(LOSS_PARTS) and parts["contrastive"] == 0.0
    # TISR is built last: with it on, every other part starts from the very same weights.
    on = MedPLIB.from_preset("tiny", seed=0, **ON).model.state_dict()
    assert {k for k in on if k.startswith("tisr.")} and all(torch.equal(on[k], a[k]) for k in a)
    # A config.json written before TISR existed loads with it off.
    old = default.config.to_dict()
    del old["tisr"]
    assert MedPLIBConfig.from_dict(old).tisr.enabled is False
    with pytest.raises(ConfigError, match="tisr.tokens"):
        preset("tiny", **{"tisr.tokens": 0})


def test_the_prompt_carries_k_pseudo_words_from_the_word_space(reports: tuple[Path, list]) -> None:
    off = MedPLIB.from_preset("tiny", seed=0)
    m = MedPLIB.from_preset("tiny", seed=0, **ON)
    n = m.config.vision.num_image_tokens
    assert m.processor.num_image_tokens == m.config.num_query_tokens == n + K
    img = reports[1][0].image
    p_off = off.processor.encode_prompt(REPORT_PROMPT, img.shape[:2])
    p_on = m.processor.encode_prompt(REPORT_PROMPT, img.shape[:2])
    assert p_on.input_ids.numel() == p_off.input_ids.numel() + K
    assert int((p_on.input_ids == m.processor.image_id).sum()) == n + K
    # The query span's last K slots hold the pseudo-words; the image tokens before them are as without TISR.
    _, feats = m.image_features(img)
    with torch.no_grad():
        words = m.model.pseudo_words(feats.vision)  # (1, K, H)
        emb = m.model.embed(p_on.input_ids[None], feats.vision, [[]])[0]
        emb_off = off.model.embed(p_off.input_ids[None], feats.vision, [[]])[0]
    slots = torch.nonzero(p_on.input_ids == m.processor.image_id)[:, 0]
    assert words.shape == (1, K, m.model.llm.config.hidden_size)
    assert torch.equal(emb[slots[-K:]], words[0]) and torch.equal(emb[slots[:n]], emb_off[slots[:n]])
    # Convex combinations of word rows: never longer than the longest real word embedding.
    vocab = m.model.llm.get_input_embeddings().weight
    assert float(words.norm(dim=-1).max()) <= float(vocab.detach().norm(dim=-1).max()) + 1e-6


def test_a_few_steps_lower_the_report_ce_and_the_contrastive_loss(trained: dict) -> None:
    before, after = trained["before"], trained["after"]
    assert after["ce"] < 0.5 * before["ce"]
    assert after["contrastive"] < 0.8 * before["contrastive"]
    assert all(g > 0 for g in trained["grads"].values())  # the loss reaches every TISR parameter
    assert all(torch.isfinite(torch.tensor(row["contrastive"])) for row in trained["history"])


def test_the_contrastive_loss_is_a_safe_zero_without_a_pair(reports: tuple[Path, list]) -> None:
    m = MedPLIB.from_preset("tiny", seed=0, **ON)
    items = _encode(m, reports[1])
    m.model.train()
    for batch in (m.collate(items[:1]), m.collate([items[1], items[1]])):  # batch 1; one report twice
        out = m.model(**batch)
        assert out.parts["contrastive"].item() == 0.0
        REPORT_WEIGHTS.combine(out.parts).backward()
        for name, p in m.model.tisr.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        m.model.zero_grad(set_to_none=True)
    # Batch 1 alone: the zero keeps the graph and every TISR gradient is exactly 0.
    out = m.model(**m.collate(items[:1]))
    out.parts["contrastive"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.model.tisr.parameters())
    m.model.zero_grad(set_to_none=True)
    batch = m.collate(items[:2])
    batch.pop("labels")
    assert m.model(**batch).parts["contrastive"].item() == 0.0  # no labels, no report text


def test_save_load_round_trip_gives_identical_logits(trained: dict, tmp_path: Path) -> None:
    m = trained["m"]
    folder = m.save_pretrained(tmp_path / "tisr")
    assert json.loads((folder / "config.json").read_text())["tisr"] == {"enabled": True, "tokens": K,
                                                                       "temperature": 0.1}
    loaded = MedPLIB.from_pretrained(folder)
    assert loaded.config.tisr.enabled and loaded.model.tisr is not None
    logits, parts = _eval(m, trained["batch"])
    logits2, parts2 = _eval(loaded, trained["batch"])
    assert torch.equal(logits, logits2) and parts == parts2


def test_generate_answers_with_the_pseudo_words(trained: dict, reports: tuple[Path, list]) -> None:
    m = trained["m"]
    img = reports[1][0].image
    cached = m.generate(img, REPORT_PROMPT, max_new_tokens=16)
    plain = m.generate(img, REPORT_PROMPT, max_new_tokens=16, use_cache=False)
    assert cached.token_ids and cached.token_ids == plain.token_ids and cached.text
    assert cached.prompt_tokens == m.processor.encode_prompt(REPORT_PROMPT, img.shape[:2]).input_ids.numel()
    # The pseudo-words steer the answer: without them (the slots back to the mean word) the logits change.
    req = m.decode_request(REPORT_PROMPT, features=m.image_features(img))
    with torch.no_grad():
        emb = m.model.embed(req.input_ids[None], req.features.vision, [[]])
        mean_word = m.model.llm.get_input_embeddings().weight.mean(dim=0)
        blank = m.model.embed(req.input_ids[None], req.features.vision, [[]],
                              pseudo_words=mean_word.expand(1, K, -1))
        dec = m.model.llm.get_decoder()
        assert not torch.equal(dec(inputs_embeds=emb).last_hidden_state[:, -1],
                               dec(inputs_embeds=blank).last_hidden_state[:, -1])


def test_the_tisr_group_trains_the_plug_in_alone() -> None:
    m = MedPLIB.from_preset("tiny", seed=0, **ON)
    n = set_trainable(m.model, ["tisr"])
    assert n == sum(p.numel() for p in m.model.tisr.parameters())
    assert {name.split(".")[0] for name, p in m.model.named_parameters() if p.requires_grad} == {"tisr"}
