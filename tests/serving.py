"""`zoo serve` as a real subprocess on a free loopback port, for the API and browser tests (stopped by its pid), and
its page in headless Chromium (Debian's ``chromium`` driven by playwright), for the browser test and
docs/screenshot.py."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``zoo serve MODEL --port P *args`` until `stop`; `url` is its base address. Its output goes to ``log``."""

    def __init__(self, model: str | Path, *args: str, log: Path, env: dict | None = None, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "zoo.cli", "serve", str(model), "--port",
                                             str(self.port), *args], stdout=out, stderr=subprocess.STDOUT,
                                            env=environment)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"zoo serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/metrics", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"zoo serve did not answer within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def data_url(image: Image.Image) -> str:
    """A PNG data URL of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def chromium_page(url: str):
    """A 1280x1000 page of headless Chromium at ``url`` (2-minute timeouts), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def upload_image(page, path: str | Path) -> None:
    """Put the image file into the page's image box and wait until it is shown."""
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.locator("#image img").wait_for()


def ask_and_open_experts(page, question: str):
    """Send ``question``, open the Experts tab and wait for its first heatmap (drawn once the answer is complete);
    returns that heatmap's locator."""
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.get_by_role("tab", name="Experts").click()
    heatmap = page.locator("#heatmaps img").first
    heatmap.wait_for()
    return heatmap
