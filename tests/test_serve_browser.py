"""`zoo serve`'s web page in a real headless Chromium (Debian's ``chromium``, driven by playwright): upload an image,
ask, read the streamed answer, open the Experts view and read its heatmap back, pixel by pixel."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image
from serving import CHROMIUM, ServerProcess, ask_and_open_experts, chromium_page, upload_image

from zoo.experts import beside, expert_colour, expert_map

QUESTION = "what color is the shape?"
CELL, GAP = 32, 8  # zoo.experts.beside's defaults, as the page draws them

# every distinct text of the last answer bubble, as the page updates it (the stream seen from the browser)
WATCH_ANSWER = """() => {
  window.answerTexts = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('#chat [data-testid="bot"]');
    const text = bubbles.length ? bubbles[bubbles.length - 1].innerText.trim() : null;
    if (text !== null && window.answerTexts[window.answerTexts.length - 1] !== text) window.answerTexts.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser_page(demo_checkpoint, tmp_path_factory):
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)")
    server = ServerProcess(demo_checkpoint["path"], log=tmp_path_factory.getbasetemp() / "serve-browser.log")
    try:
        with chromium_page(server.url) as page:
            yield page
    finally:
        server.stop()


def test_upload_ask_stream_and_see_the_experts(browser_page, demo_checkpoint, tmp_path):
    page, model = browser_page, demo_checkpoint["model"]
    path = demo_checkpoint["image"]
    image = Image.open(path).convert("RGB")
    expected = model.answer([image], [QUESTION])[0]
    upload_image(page, path)
    page.evaluate(WATCH_ANSWER)
    heatmap = ask_and_open_experts(page, QUESTION)
    assert page.locator('#chat [data-testid="bot"]').last.inner_text().strip() == expected
    seen = page.evaluate("window.answerTexts")
    assert seen and seen[-1] == expected and all(expected.startswith(text) for text in seen)
    assert page.locator('#chat [data-testid="user"]').last.inner_text().strip() == QUESTION

    # the heatmap image: the picture then one cell per patch of the 4x4 grid, in the colour of its expert
    (layer,) = expert_map(model, image, model.encode_prompt(QUESTION) + model.encode_answer(expected)[:-1])
    rows, cols = layer.grid.shape
    size = page.evaluate("img => [img.naturalWidth, img.naturalHeight]", heatmap.element_handle())
    assert (rows, cols) == (4, 4) and size == [2 * cols * CELL + GAP, rows * CELL]
    png = Image.open(io.BytesIO(page.request.get(heatmap.get_attribute("src")).body())).convert("RGB")
    assert png.tobytes() == beside(image, layer).tobytes()
    for r in range(rows):
        for c in range(cols):
            centre = (cols * CELL + GAP + c * CELL + CELL // 2, r * CELL + CELL // 2)
            assert png.getpixel(centre) == expert_colour(int(layer.grid[r, c]), layer.num_experts)
    assert "lm.layers.0: 4x4 patches, 4 experts" in page.locator("#heatmaps").inner_text()
    # the text tokens of the LM layer, each labelled with its expert
    tokens = page.locator("#tokens").inner_text()
    assert all(f"expert {e}" in tokens.lower() for _, e in layer.text)
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
