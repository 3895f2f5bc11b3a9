"""``zoo serve``: one process serving a web page (gradio) and an OpenAI-compatible API over the same models.

>>> app = create_app("runs/demo/model", max_batch=16)      # FastAPI: / (the page), /v1/chat/completions, /v1/models
>>> serve("runs/demo/model", port=8000)                     # uvicorn on 127.0.0.1:8000

Requests from the page and the API share each model's batching engine (`zoo.serve.engine`), so concurrent users
are answered together.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

from zoo.serve.models import ModelPool, NoModelError, default_model
from zoo.serve.requests import ImageLimits

log = logging.getLogger(__name__)


def create_app(model: str, max_batch: int = 8, batch_wait_ms: float = 5.0, api_key: str | None = None,
               allowed_root: str | Path | None = None, max_image_bytes: int = 10 * 2**20,
               max_image_pixels: int = 4096 * 4096, device: str | None = None):
    """The FastAPI app: ``model`` loaded at once (a checkpoint dir, hub id or catalogue name), the page at ``/``
    and the API under ``/v1``. ``api_key``: required as a Bearer token by ``/v1`` and as the page's password."""
    import gradio as gr
    from fastapi import FastAPI

    from zoo.serve.api import add_api
    from zoo.serve.web import CSS, build_page, example_images

    pool = ModelPool(max_batch=max_batch, wait=batch_wait_ms / 1000, device=device)
    pool.get(model)
    app = FastAPI(title="zoo serve")
    root = Path(allowed_root) if allowed_root is not None else None
    add_api(app, pool, ImageLimits(max_image_bytes, max_image_pixels, root), api_key)
    app.state.pool = pool
    auth = (lambda _user, password: secrets.compare_digest(str(password).encode(), api_key.encode())) if api_key else None
    examples = sorted({str(Path(p).parent) for p in example_images()})
    return gr.mount_gradio_app(app, build_page(pool, model), path="/", auth=auth, allowed_paths=examples,
                               run_history=False, footer_links=["api", "gradio"], css=CSS,
                               auth_message="Log in with any user name and the server's API key as password.")


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the app with uvicorn until interrupted (``model`` None: the demo's ``runs/demo/model``). ``api_key``
    defaults to ``$ZOO_API_KEY``; other options as `create_app`."""
    import uvicorn

    model = model or default_model()
    if model is None:
        raise NoModelError("give MODEL (a checkpoint dir, hub id or catalogue name); runs/demo/model, the default, "
                           "does not exist yet (make demo writes it)")
    options.setdefault("api_key", os.environ.get("ZOO_API_KEY") or None)
    # The engine thread runs hundreds of short torch ops per token, each releasing the GIL; at the default 5 ms switch
    # interval every op can wait that long behind the HTTP threads parsing a burst of requests (a convoy that made
    # a batch 5-10x slower than the same batch alone). A 0.2 ms interval bounds that wait.
    sys.setswitchinterval(2e-4)
    app = create_app(model, **options)
    log.info("serving %s on http://%s:%d", model, host, port)
    print(f"zoo serve: {model} on http://{host}:{port} (page /, API /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
