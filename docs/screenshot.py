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

from serving import ServerProcess, ask_and_open_experts, chromium_page, upload_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    parser.add_argument("--question", default="is there not a blue shape?")
    parser.add_argument("--image", type=int, default=0, help="index of the easy-vqa test image")
    args = parser.parse_args()
    from easy_vqa import get_test_image_paths

    paths = get_test_image_paths()
    image = paths[sorted(paths)[args.image]]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(args.model, log=Path(tmp) / "serve.log")
        try:
            with chromium_page(server.url) as page:
                upload_image(page, image)
                ask_and_open_experts(page, args.question)
                page.screenshot(path=args.out, full_page=True)
                answer = page.locator('#chat [data-testid="bot"]').last.inner_text().strip()
        finally:
            server.stop()
    print(f"{args.out}: {args.model} answered {args.question!r} with {answer!r}")


if __name__ == "__main__":
    main()
