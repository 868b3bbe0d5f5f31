"""The web page in a real browser: Debian's headless Chromium driven by Playwright. Upload a real
Kvasir-SEG image, draw a box, ask, wait for the mask overlay, save a screenshot.

Under CI (CI=true) a missing browser is a failure: `make test` installs it. Elsewhere the test
skips with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import KVASIR_QUESTION, kvasir_images
from PIL import Image

from medplib.inference import Predictor
from medplib.serving.app import ServerSettings, create_app
from medplib.serving.testing import background_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = os.environ.get("MEDPLIB_SCREENSHOTS")  # set to keep the screenshot for a person to look at


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium; `make test` does it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def page_url(kvasir_model: Path) -> Iterator[str]:
    app = create_app(Predictor.from_pretrained(kvasir_model), ServerSettings(model_name="kvasir-tiny"))
    with background_server(app) as base:
        yield base + "/"


def test_box_question_shows_mask_overlay(page_url: str, shared_data: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    image_id, rgb, gt = kvasir_images(shared_data, 1)[0]
    image_file = shared_data / "kvasir_seg" / "images" / f"{image_id}.jpg"
    shot = Path(SCREENSHOT_DIR or tmp_path) / "web_overlay.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            # The page must need nothing but this server (no CDN): record any other request.
            page.on("request",
                    lambda req: None if req.url.startswith((page_url, "data:", "blob:")) else outside.append(req.url))
            page.goto(page_url)
            page.set_input_files("#file", str(image_file))
            page.wait_for_function("document.getElementById('status').textContent.includes('pixels')", timeout=30_000)

            # Draw a box around the polyp's bounding box, in screen coordinates of the scaled canvas.
            page.click("button[data-tool=box]")
            box = page.locator("#canvas").bounding_box()
            assert box is not None
            sx, sy = box["width"] / rgb.shape[1], box["height"] / rgb.shape[0]
            ys, xs = gt.nonzero()
            page.mouse.move(box["x"] + xs.min() * sx, box["y"] + ys.min() * sy)
            page.mouse.down()
            page.mouse.move(box["x"] + xs.max() * sx, box["y"] + ys.max() * sy, steps=8)
            page.mouse.up()
            assert page.evaluate("state.pending.length") == 1

            page.fill("#question", KVASIR_QUESTION)
            page.click("#ask")
            page.wait_for_selector("#canvas[data-overlay=shown]", timeout=60_000)
            answer = page.locator("#history li.assistant").last.inner_text()
            assert "Sure, it is [SEG]." in answer and "1 mask" in answer
            assert page.get_attribute("#download", "href").startswith("data:image/png;base64,")
            page.screenshot(path=str(shot))

            # At the polyp's centre the canvas shows the image blended with the mask colour at the
            # chosen opacity (0.45); with the overlay off, the image itself.
            cy, cx = (int(v) for v in np.median(np.argwhere(gt), axis=0))
            pixel = f"Array.from(ctx.getImageData({cx}, {cy}, 1, 1).data).slice(0, 3)"
            expected = 0.55 * rgb[cy, cx].astype(float) + 0.45 * np.array([255, 64, 64])
            assert np.abs(np.array(page.evaluate(pixel)) - expected).max() <= 3, (page.evaluate(pixel), expected)
            page.fill("#opacity", "1")
            assert page.evaluate(pixel) == [255, 64, 64]
            page.uncheck("#show-overlay")
            assert page.get_attribute("#canvas", "data-overlay") == "hidden"
            assert page.evaluate(pixel) == rgb[cy, cx].tolist()
            page.check("#show-overlay")
            page.fill("#opacity", "0.45")

            # A second question keeps the history: two user bubbles, two answers.
            page.fill("#question", "What is in the image?")
            page.click("#ask")
            page.wait_for_function("document.querySelectorAll('#history li.assistant small').length == 2",
                                   timeout=60_000)
            assert page.locator("#history li.user").count() == 2
        finally:
            browser.close()
    assert outside == []
    assert Image.open(shot).size == (1200, 800)



def test_in_context_example_pairs_are_sent_and_a_bad_one_is_named(page_url: str, shared_data: Path,
                                                                   tmp_path: Path) -> None:
    """The example picker: add a real Kvasir (image, mask) pair, ask, and the request carries it; a mask of
    another size gets the server's 400, shown in the answer bubble; clearing empties the list."""
    import json

    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    folder = shared_data / "kvasir_seg"
    (query_id, _, _), (ex_id, _, _) = kvasir_images(shared_data, 2)
    small_mask = tmp_path / "small_mask.png"
    Image.open(folder / "masks" / f"{ex_id}.jpg").convert("L").resize((64, 64)).save(small_mask)
    sent: list[dict] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("request", lambda req: sent.append(json.loads(req.post_data))
                    if req.url.endswith("/v1/chat/completions") else None)
            page.goto(page_url)
            page.set_input_files("#file", str(folder / "images" / f"{query_id}.jpg"))
            page.wait_for_function("document.getElementById('status').textContent.includes('pixels')", timeout=30_000)

            page.click("#examples-panel summary")
            assert page.is_disabled("#add-example")  # an image without its mask is not a pair yet
            page.set_input_files("#example-image", str(folder / "images" / f"{ex_id}.jpg"))
            page.set_input_files("#example-mask", str(folder / "masks" / f"{ex_id}.jpg"))
            page.click("#add-example")
            assert page.inner_text("#examples-count") == "(1)"
            assert page.locator("#examples li").count() == 1

            page.fill("#question", "Segment the same structure in this image.")
            page.click("#ask")
            page.wait_for_selector("#history li.assistant small", timeout=60_000)  # answered (timings shown)
            assert "1 example" in page.locator("#history li.user").last.inner_text()
            pairs = sent[-1]["medplib"]["examples"]
            assert len(pairs) == 1 and pairs[0]["image"].startswith("data:image/jpeg;base64,")
            assert pairs[0]["mask"].startswith("data:image/jpeg;base64,")

            # A mask of another size than its image: the server names it, the page shows it as the answer.
            page.click("#clear-examples")
            assert page.inner_text("#examples-count") == "(none)" and page.locator("#examples li").count() == 0
            page.set_input_files("#example-image", str(folder / "images" / f"{ex_id}.jpg"))
            page.set_input_files("#example-mask", str(small_mask))
            page.click("#add-example")
            page.fill("#question", "Segment the same structure in this image.")
            page.click("#ask")
            page.wait_for_selector("#history li.assistant.error", timeout=60_000)
            error = page.locator("#history li.assistant.error").inner_text()
            assert "64x64" in error and "mask" in error, error
            assert page.evaluate("state.turns.length") == 2  # the failed question left the conversation as it was
        finally:
            browser.close()
