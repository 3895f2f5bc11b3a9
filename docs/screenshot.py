"""The README's picture of `zoo serve`: the page of a trained model (default ``runs/demo/model``, what `make demo`
writes) in headless Chromium, after one question about an easy-vqa test image, with the Experts view open.

    .venv/bin/python docs/screenshot.py                            # from the checkout: -> docs/serve.png
    .venv/bin/python docs/screenshot.py --model runs/x/model --out /tmp/page.png

Needs Debian's ``chromium`` (``apt-get install chromium``) and playwright (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from serving import ServerProcess  # noqa: E402
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    parser.add_argument("--question", default="is there not a blue shape?")
    parser.add_argument("--image", type=int, default=0, help="index of the easy-vqa test image")
    args = parser.parse_args()
    from easy_vqa import get_test_image_paths
    from playwright.sync_api import sync_playwright

    image = get_test_image_paths()[sorted(get_test_image_paths())[args.image]]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.model, log=Path(tmp) / "serve.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(120_000)
                page.goto(server.url)
                page.locator("#image input[type=file]").set_input_files(image)
                page.locator("#image img").wait_for()
                page.locator("#question textarea").fill(args.question)
                page.locator("#send").click()
                page.get_by_role("tab", name="Experts").click()
                page.locator("#heatmaps img").first.wait_for()
                page.screenshot(path=args.out, full_page=True)
                answer = page.locator('#chat [data-testid="bot"]').last.inner_text().strip()
                browser.close()
        finally:
            server.stop()
    print(f"{args.out}: {args.model} answered {args.question!r} with {answer!r}")


if __name__ == "__main__":
    main()
