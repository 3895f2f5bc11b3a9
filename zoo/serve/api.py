"""The OpenAI-compatible HTTP API: ``POST /v1/chat/completions`` (plain and SSE streaming, with ``usage``) and
``GET /v1/models``, on FastAPI, answered by the models' batching engines; ``GET /metrics`` counts the batches.

Errors are OpenAI error objects with a 4xx status (`zoo.serve.requests.RequestError`); with an API key, every
``/v1`` request needs ``Authorization: Bearer <key>`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from zoo.chat import conversation_ids
from zoo.serve.engine import Completion, Engine, spliced_length
from zoo.serve.models import ModelPool
from zoo.serve.requests import ChatRequest, ImageLimits, RequestError, read_chat_request


class KeyCheck:
    """ASGI middleware: an HTTP request under ``/v1`` without ``Authorization: Bearer <key>`` gets 401 and the OpenAI
    error object. Plain ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware behind that runs every
    request in an extra task and pipes every response through a memory stream."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not secrets.compare_digest(given, self.expected):
                error = RequestError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                     code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventRelay:
    """Hands the engine thread's events to the asyncio queues of one event loop. Events sent while a hand-over is
    already scheduled ride along with it, so the events a batch step makes for all its requests wake the loop once
    (``call_soon_threadsafe`` writes the loop's wake-up pipe on every call) and still arrive one by one, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def sink(self, events: asyncio.Queue) -> Callable[[object], None]:
        """The engine's sink for one request: its events go to ``events``."""
        return lambda event: self.send(events, event)

    def send(self, events: asyncio.Queue, event: object) -> None:
        with self._lock:
            self._pending.append((events, event))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for events, event in pending:
            events.put_nowait(event)


def add_api(app: FastAPI, pool: ModelPool, limits: ImageLimits, api_key: str | None = None) -> None:
    """Add the ``/v1`` routes (and their key check) to ``app``."""
    if api_key:
        app.add_middleware(KeyCheck, api_key=api_key)
    relays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # an EventRelay per event loop

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "zoo"}
                                           for name in pool.names()]}

    @app.get("/metrics")
    async def metrics():
        """Batching counters per model, in Prometheus' text format."""
        lines = []
        for name, engine in list(pool.engines.items()):
            sizes = list(engine.batch_sizes)
            label = json.dumps(name)
            lines += [f"zoo_batches_total{{model={label}}} {len(sizes)}",
                      f"zoo_batched_requests_total{{model={label}}} {sum(sizes)}",
                      f"zoo_batch_size_max{{model={label}}} {max(sizes, default=0)}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from e
        chat = await asyncio.to_thread(read_chat_request, body, limits)
        if chat.model not in pool.names():
            raise RequestError(404, f"model: {chat.model!r} is not served here; served: {', '.join(pool.names())}",
                               "model", "model_not_found")
        engine = pool.get(chat.model)
        loop = asyncio.get_running_loop()
        relay = relays.get(loop) or relays.setdefault(loop, EventRelay(loop))
        events = submit(engine, chat, relay)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model}
        if chat.stream:
            return StreamingResponse(sse(events, reply, chat.include_usage), media_type="text/event-stream")
        return await complete(events, reply)


def submit(engine: Engine, chat: ChatRequest, relay: EventRelay) -> asyncio.Queue:
    """Queue the request on ``engine``; its events arrive (through ``relay``) on the returned asyncio queue."""
    model = engine.model
    try:
        prompt = conversation_ids(model, chat.turns)
    except ValueError as e:
        raise RequestError(400, f"messages: {e}", "messages") from e
    prompt_tokens = spliced_length(model, prompt)
    room = model.config.max_length - prompt_tokens
    if room < 1 or (chat.max_tokens or 0) > room:
        asked = f" + max_tokens {chat.max_tokens}" if chat.max_tokens else ""
        raise RequestError(400, f"the conversation is {prompt_tokens} tokens with the image{asked}, over the model's "
                           f"{model.config.max_length}-token context", "messages", "context_length_exceeded")
    config = chat.config
    config.max_new_tokens = chat.max_tokens or room
    events: asyncio.Queue = asyncio.Queue()
    engine.submit(prompt, chat.image, config, chat.seed, relay.sink(events))
    return events


async def complete(events: asyncio.Queue, reply: dict) -> JSONResponse:
    """The non-streaming answer."""
    while True:
        kind, value = await events.get()
        if kind == "error":
            return JSONResponse(RequestError(500, value, code="generation_failed").body(), status_code=500)
        if kind == "done":
            message = {"role": "assistant", "content": value.text}
            return JSONResponse({**reply, "object": "chat.completion", "usage": usage(value),
                                 "choices": [{"index": 0, "message": message, "finish_reason": value.finish_reason,
                                              "logprobs": None}]})


async def sse(events: asyncio.Queue, reply: dict, include_usage: bool) -> AsyncIterator[str]:
    """The streaming answer: ``chat.completion.chunk`` events, the usage chunk if asked, then ``[DONE]``."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return f"data: {json.dumps({**reply, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, value = await events.get()
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "error":
            yield f"data: {json.dumps(RequestError(500, value, code='generation_failed').body())}\n\n"
            break
        else:
            done: Completion = value
            yield chunk({}, done.finish_reason)
            if include_usage:
                body = {**reply, "object": "chat.completion.chunk", "choices": [], "usage": usage(done)}
                yield f"data: {json.dumps(body)}\n\n"
            break
    yield "data: [DONE]\n\n"


def usage(done: Completion) -> dict:
    """OpenAI ``usage``: prompt tokens count the image's tokens, completion tokens the EOS when one was made."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
