"""In-context examples in the prompt, on real Kvasir-SEG polyps and chest X-ray lung masks: the prompt
layout (pooled example tokens before the query's), 0-3 examples giving the same tokens with and without
the KV cache (overlay and separate encodings), the prefix cache never reused for other examples, the
Predictor's per-image cache holding example images, regions on the query, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kvasir_images
from PIL import Image

from medplib.api import MedPLIB
from medplib.errors import InputError
from medplib.inference import Predictor
from medplib.model.medplib import ImageFeatures
from medplib.retrieval.examples import load_example

QUESTION = "Segment the same structure in this image."
SIDE = 128  # real images, shrunk: the tiny preset reads 112 px, and the CPU is shared


def _small(img: np.ndarray, mask: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    s = SIDE / max(h, w)
    size = size or (max(2, round(w * s)), max(2, round(h * s)))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR)), small_mask


@pytest.fixture(scope="module")
def polyps(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Five real Kvasir-SEG (image, polyp mask) pairs; the last one is the query, 96 x 128 (W x H) so that
    its size differs from the examples'."""
    pairs = kvasir_images(shared_data, 5)
    return [_small(img, mask) for _, img, mask in pairs[:4]] + [_small(pairs[4][1], pairs[4][2], (96, 128))]


@pytest.fixture(scope="module", params=["overlay", "separate"])
def model(request: pytest.FixtureRequest) -> MedPLIB:
    m = MedPLIB.from_preset("tiny", seed=0, **{"icl.encoding": request.param})
    m.model.eval()
    return m


def _sampled(m: MedPLIB, req, use_cache: bool, seed: int = 0) -> list[int]:
    """Tokens sampled at temperature 1 with a seeded generator: a random model's greedy answer repeats
    one token, a sampled one follows every change of the logits."""
    return m.model.generate(req.input_ids[None], req.features, req.pixel_values, req.region_masks, req.original_hw,
                            req.pixel_valid_hw, max_new_tokens=10, use_cache=use_cache, temperature=1.0,
                            generator=torch.Generator().manual_seed(seed), examples=req.examples).token_ids


def test_prompt_layout_pools_examples_and_keeps_the_query_last(model: MedPLIB, polyps) -> None:
    cfg, proc = model.config, model.processor
    assert cfg.example_grid == 5 and cfg.num_example_tokens == 25  # tiny: 8 x 8 query grid, 2/3 of its side
    ex = model.example_features(polyps[:2])
    assert len(ex) == 2 * cfg.images_per_example and all(f.shape == (1, 64, 64) for f in ex)
    req = model.decode_request(QUESTION, features=model.image_features(polyps[4][0]), examples=ex)
    ids = req.input_ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == proc.im_start_id]
    runs = [ids[s + 1:].index(proc.im_end_id) for s in starts]
    assert runs == [25] * len(ex) + [64]  # every example pooled, the query (last) at full size
    text = proc.tokenizer.decode([t for t in ids if t != proc.image_id])
    assert text.count("Here is") == 2 and text.index("Here is") < text.index(QUESTION)
    # The embedding holds the pooled, projected example features where their tokens are.
    emb = model.model.embed(req.input_ids[None], req.features.vision, [[]], [req.examples])[0]
    first = model.model.projector(model.model._pool_tokens(ex[0], 5))[0]
    torch.testing.assert_close(emb[starts[0] + 1:starts[0] + 26], first)
    query = model.model.projector(model.model._pool_tokens(req.features.vision))[0]
    torch.testing.assert_close(emb[starts[-1] + 1:starts[-1] + 65], query)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_same_tokens_with_and_without_the_kv_cache(model: MedPLIB, polyps, k: int) -> None:
    req = model.decode_request(QUESTION, features=model.image_features(polyps[4][0]),
                               examples=model.example_features(polyps[:k]))
    cached = _sampled(model, req, True)
    assert cached == _sampled(model, req, False)
    greedy = model.generate(polyps[4][0], QUESTION, examples=polyps[:k], max_new_tokens=6)
    assert greedy.token_ids == model.generate(polyps[4][0], QUESTION, examples=polyps[:k], max_new_tokens=6,
                                              use_cache=False).token_ids
    if k:  # the examples reach the model: the prompt's last hidden state differs without them
        alone = model.decode_request(QUESTION, features=model.image_features(polyps[4][0]))
        assert not torch.allclose(_last_hidden(model, req), _last_hidden(model, alone), atol=1e-5)


def _last_hidden(m: MedPLIB, req) -> torch.Tensor:
    """(H,) the LLM's final hidden state at the prompt's last token (what predicts the first answer token)."""
    emb = m.model.embed(req.input_ids[None], req.features.vision, [req.region_masks], [req.examples])
    return m.model.llm.get_decoder()(inputs_embeds=emb).last_hidden_state[0, -1]


def test_prefix_cache_is_not_reused_for_other_examples(model: MedPLIB, polyps) -> None:
    """Example tokens all carry the `<image>` id: a prefix computed with examples A must not answer for B."""
    img, feats = model.image_features(polyps[4][0])
    a, b = model.example_features(polyps[:1]), model.example_features(polyps[1:2])

    def keys(f) -> torch.Tensor:
        return torch.cat([layer.keys for layer in f.prefix_cache.layers])

    first = _sampled(model, model.decode_request(QUESTION, features=(img, feats), examples=a), True)
    cache_a, keys_a = feats.prefix_cache, keys(feats)
    assert all(x is y for x, y in zip(feats.prefix_examples, a))
    assert _sampled(model, model.decode_request(QUESTION, features=(img, feats), examples=a), True) == first
    assert feats.prefix_cache is cache_a  # the same examples again: the prefix is reused
    after_b = _sampled(model, model.decode_request(QUESTION, features=(img, feats), examples=b), True)
    assert feats.prefix_cache is not cache_a  # same token ids, other examples: recomputed
    fresh = ImageFeatures(vision=feats.vision)
    assert after_b == _sampled(model, model.decode_request(QUESTION, features=(img, fresh), examples=b), True)
    torch.testing.assert_close(keys(feats), keys(fresh))  # what B's answer attends to is B's prefix ...
    assert not torch.allclose(keys(feats), keys_a, atol=1e-4)  # ... which is not A's


def test_predictor_caches_example_images_and_grounds_the_query(model: MedPLIB, polyps) -> None:
    p = Predictor(model, cache_entries=16)
    query, qmask = polyps[4]
    p.set_image(query)
    ex = polyps[:2]
    first = p.ask(QUESTION + " [SEG]", examples=ex, max_new_tokens=4)
    n_images = 1 + 2 * model.config.images_per_example
    assert len(p._cache) == n_images  # the query and every example prompt image, each once
    assert p.original_hw == qmask.shape  # the query stays current
    again = p.ask(QUESTION + " [SEG]", examples=ex, max_new_tokens=4)
    assert again.token_ids == first.token_ids and len(p._cache) == n_images
    assert again.prompt_tokens == first.prompt_tokens == len(model.decode_request(
        QUESTION + " [SEG]", features=model.image_features(query), examples=model.example_features(ex)).input_ids)
    # A region on the query image; its mask is the query's size.
    y, x = (int(v.mean()) for v in np.nonzero(qmask))
    from medplib.data.schema import PointRegion

    out = p.ask("Segment the same structure as <region>. [SEG]", [PointRegion(point=(x + 0.5, y + 0.5))],
                examples=ex, max_new_tokens=4)
    assert out.text is not None and p.region_masks([PointRegion(point=(x + 0.5, y + 0.5))])[0].shape == qmask.shape
    # A [SEG] decodes on the query: its pixel embedding, at its size (an example's would be another size).
    from medplib.model.decoding import masks as decode_masks
    from medplib.model.medplib import GenerationOutput

    req = model.decode_request(QUESTION, features=model.image_features(query), examples=model.example_features(ex))
    out = decode_masks(model.model, req, [model.processor.seg_id], [_last_hidden(model, req)], GenerationOutput)
    assert polyps[0][1].shape != qmask.shape and out.mask_logits[0].shape == qmask.shape


def test_ask_batch_with_examples_equals_ask(model: MedPLIB, polyps) -> None:
    from medplib.inference import Query

    p = Predictor(model)
    queries = [Query(polyps[4][0], QUESTION, examples=polyps[:k], max_new_tokens=5) for k in (0, 2)]
    batched = p.ask_batch(queries)
    for q, b in zip(queries, batched):
        p.set_image(q.image)
        assert not isinstance(b, Exception) and b.token_ids == p.ask(q.question, examples=q.examples,
                                                                      max_new_tokens=5).token_ids


def test_real_xray_lung_examples(shared_data: Path, model: MedPLIB) -> None:
    root = shared_data / "covid_cxr_lungs"
    names = sorted(p.stem for p in (root / "images").glob("*.png"))[:3]
    exs = [load_example(f"images/{n}.png", f"lung_masks/{n}_mask.png", root, label="lungs") for n in names[:2]]
    query = np.asarray(Image.open(root / "images" / f"{names[2]}.png").convert("RGB"))
    a = model.generate(query, QUESTION, examples=exs, max_new_tokens=4)
    assert a.token_ids == model.generate(query, QUESTION, examples=exs, max_new_tokens=4, use_cache=False).token_ids


def test_malformed_examples_are_clear_errors(model: MedPLIB, polyps, tmp_path: Path) -> None:
    img, mask = polyps[0]
    with pytest.raises(InputError, match=r"example 1: the mask is \d+x\d+ \(WxH\) but the image is"):
        model.generate(polyps[4][0], QUESTION, examples=[(img, mask[:-3])])
    with pytest.raises(InputError, match="example 2: the mask is empty"):
        model.generate(polyps[4][0], QUESTION, examples=[(img, mask), (img, np.zeros_like(mask))])
    with pytest.raises(InputError, match="image file not found"):
        model.generate(polyps[4][0], QUESTION, examples=[(tmp_path / "gone.png", tmp_path / "gone_mask.png")])
    with pytest.raises(InputError, match="at most 3"):
        model.generate(polyps[4][0], QUESTION, examples=[(img, mask)] * 4)
    with pytest.raises(InputError, match="placeholders"):  # two <image> for one overlay/separate example + query
        model.generate(polyps[4][0], "<image> <image> <image> <image> what?", examples=[(img, mask)])
