"""The web page's slice slider in a real browser (headless Chromium driven by Playwright, as in
test_web.py): open a NIfTI phantom, move through its slices, ask for a mask, see it overlaid on
the slices that have one and not on the others, and get the NIfTI mask link."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
from conftest import KVASIR_QUESTION
from test_web import CHROMIUM_ARGS, SCREENSHOT_DIR, _chromium

from medplib.data.phantoms3d import make_phantom_volume, write_phantom_volume
from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server
from medplib.volume_inference import VolumeSlices


@pytest.fixture(scope="module")
def page_url(kvasir_model: Path) -> Iterator[str]:
    app = create_app(Predictor.from_pretrained(kvasir_model), ServerSettings(model_name="kvasir-tiny"))
    with background_server(app) as base:
        yield base + "/"


def test_slice_slider_shows_each_slice_and_its_mask(page_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    phantom = make_phantom_volume("mr", seed=4, shape=(48, 44, 8))
    paths = write_phantom_volume(phantom, tmp_path / "case")
    vs = VolumeSlices(phantom.volume, axis=2)
    shot = Path(SCREENSHOT_DIR or tmp_path) / "web_volume.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(page_url)
            assert not page.is_visible("#slice")  # no slider before a volume is open
            page.set_input_files("#volume-file", paths["image"])
            page.wait_for_function("document.getElementById('status').textContent.includes('slices')", timeout=60_000)
            assert page.is_visible("#slice") and page.get_attribute("#slice", "max") == "7"
            assert page.get_attribute("#canvas", "data-slice") == "4"  # the middle slice first
            assert page.is_disabled("button[data-tool=box]")  # 2-D tools are off on a volume

            def pixel(r: int, c: int) -> list[int]:
                return page.evaluate(f"Array.from(ctx.getImageData({c}, {r}, 1, 1).data).slice(0, 3)")

            def go(k: int) -> None:
                page.fill("#slice", str(k))  # an input event, as dragging the slider sends
                page.wait_for_function(f"document.getElementById('canvas').dataset.slice === '{k}'")

            # each slice position shows that slice, as the model sees it
            for k in (0, 5):
                go(k)
                img = vs.image(k)
                r, c = np.unravel_index(np.argmax(img[..., 0]), img.shape[:2])
                assert pixel(int(r), int(c)) == img[r, c].tolist()

            page.fill("#question", KVASIR_QUESTION)
            page.click("#ask")
            page.wait_for_selector("#download-volume:not(.disabled)", timeout=120_000)
            href = page.get_attribute("#download-volume", "href")
            assert href.startswith("data:application/gzip;base64,")
            nifti = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(href.split(",", 1)[1])))
            mask = np.asarray(nifti.dataobj) > 0
            assert mask.shape == phantom.volume.shape and mask.any()
            masked = [k for k in range(8) if mask[:, :, k].any()]
            k = masked[0]
            go(k)
            assert page.get_attribute("#canvas", "data-overlay") == "shown"
            view, img = vs.view(mask, k), vs.image(k)
            r, c = np.argwhere(view)[0]
            expected = 0.55 * img[r, c].astype(float) + 0.45 * np.array([255, 64, 64])
            assert np.abs(np.array(pixel(int(r), int(c))) - expected).max() <= 3
            off = np.argwhere(~view)[0]
            assert pixel(int(off[0]), int(off[1])) == img[off[0], off[1]].tolist()  # outside the mask: the slice
            empty = [j for j in range(8) if not mask[:, :, j].any()]
            if empty:
                go(empty[0])
                assert page.get_attribute("#canvas", "data-overlay") == "hidden"
            assert "voxels" in page.locator("#history li.assistant").last.inner_text()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
