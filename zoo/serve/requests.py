"""OpenAI chat-completion requests read into what a zoo model needs, every bad field a `RequestError` (4xx) that
names it: the conversation as ``(question, answer)`` turns, its one image, the generation options.

Images come as ``image_url`` parts: a ``data:`` URL (base64) or a local file (``file://`` URL or path) inside the
server's allowed root; remote URLs are not fetched. Size limits apply before decoding (bytes) and before loading
pixels (width x height from the header), so an oversize upload never reaches memory as pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from transformers import GenerationConfig

from zoo.generation import sampling_config


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the problem, the OpenAI ``param`` (the bad
    field's path) and ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The OpenAI error object."""
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ImageLimits:
    """What an ``image_url`` may be: at most ``max_bytes`` encoded and ``max_pixels`` decoded; local files only
    under ``allowed_root`` (None: no local files)."""

    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    allowed_root: Path | None = None


@dataclass
class ChatRequest:
    """A valid request: ``turns`` ``[(question, answer), ..., (question, None)]``, its image, the options."""

    model: str
    turns: list[tuple[str, str | None]]
    image: Image.Image
    config: GenerationConfig
    seed: int | None
    max_tokens: int | None
    stream: bool
    include_usage: bool


# fields accepted with their OpenAI defaults only (a value that asks for something else is refused)
_DEFAULT_ONLY = {"n": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                 "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
                 "response_format": (None, {"type": "text"})}
_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
           "repetition_penalty", "seed", "stop", "stream", "stream_options", "user", *_DEFAULT_ONLY}


def read_chat_request(body: object, limits: ImageLimits) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body (a parsed JSON value)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(400, f"{unknown[0]}: unknown field; accepted: {', '.join(sorted(_FIELDS))}", unknown[0])
    for name, allowed in _DEFAULT_ONLY.items():
        if body.get(name) not in allowed:
            raise RequestError(400, f"{name}: not supported by this server (accepted: {allowed[1]!r})", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "model: required, the id of a served model (GET /v1/models)", "model")
    turns, image = read_messages(body.get("messages"), limits)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    _check(max_tokens is None or _is_int(max_tokens) and max_tokens >= 1, "max_tokens", "an integer >= 1", max_tokens)
    temperature = body.get("temperature")
    _check(temperature is None or _is_number(temperature) and 0 <= temperature <= 2, "temperature",
           "a number from 0 to 2", temperature)
    top_p, top_k, min_p = body.get("top_p"), body.get("top_k"), body.get("min_p")
    _check(top_p is None or _is_number(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1]", top_p)
    _check(top_k is None or _is_int(top_k) and top_k >= -1, "top_k", "an integer >= 0 (0 or -1: off)", top_k)
    _check(min_p is None or _is_number(min_p) and 0 <= min_p <= 1, "min_p", "a number in [0, 1]", min_p)
    penalty = body.get("repetition_penalty")
    _check(penalty is None or _is_number(penalty) and penalty > 0, "repetition_penalty", "a number > 0", penalty)
    seed = body.get("seed")
    _check(seed is None or _is_int(seed), "seed", "an integer", seed)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    _check(stops is None or isinstance(stops, list) and all(isinstance(s, str) and s for s in stops), "stop",
           "a non-empty string or a list of them", stop)
    stream = body.get("stream", False)
    _check(isinstance(stream, bool) or stream is None, "stream", "true or false", stream)
    options = body.get("stream_options") or {}
    _check(isinstance(options, dict) and set(options) <= {"include_usage"}, "stream_options",
           "an object with include_usage", options)
    config = sampling_config(temperature=temperature or 0.0, top_p=top_p, top_k=max(top_k, 0) if top_k else None,
                             min_p=min_p, repetition_penalty=penalty, stop=stops)
    return ChatRequest(model, turns, image, config, seed, max_tokens, bool(stream),
                       bool(options.get("include_usage", False)))


def read_messages(messages: object, limits: ImageLimits) -> tuple[list[tuple[str, str | None]], Image.Image]:
    """``messages`` -> conversation turns and the image: user and assistant messages alternating from a user one to
    a last user one, exactly one ``image_url`` part (in a user message)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: required, a non-empty list of {role, content} objects", "messages")
    turns: list[tuple[str, str | None]] = []
    images: list[tuple[str, Image.Image]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where}: expected an object with role and content", where)
        role = message.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role in ("system", "developer", "tool"):
            raise RequestError(400, f"{where}.role: {role!r} messages are not supported: the model's prompt template "
                               "has no place for them", f"{where}.role")
        if role != expected:
            raise RequestError(400, f"{where}.role: expected {expected!r} (user and assistant turns alternate, "
                               f"starting and ending with user), got {role!r}", f"{where}.role")
        text = _message_text(message.get("content"), where, images if role == "user" else None, limits)
        if role == "user":
            if not text:
                raise RequestError(400, f"{where}.content: the question is empty", f"{where}.content")
            turns.append((text, None))
        else:
            turns[-1] = (turns[-1][0], text)
    if turns[-1][1] is not None:
        raise RequestError(400, "messages: the last message must be the user's question", "messages")
    if not images:
        raise RequestError(400, "messages: this model answers about an image; add an image_url part (a data URL "
                           "or a local path under the allowed root) to a user message", "messages", "image_required")
    if len(images) > 1:
        raise RequestError(400, f"messages: {len(images)} images ({', '.join(p for p, _ in images)}); the model "
                           "reads one image per conversation", images[1][0], "too_many_images")
    return turns, images[0][1]


def _message_text(content: object, where: str, images: list | None, limits: ImageLimits) -> str:
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise RequestError(400, f"{where}.content: expected a string or a list of parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        path = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"].strip())
        elif kind == "image_url" and images is not None:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(400, f"{path}.image_url.url: expected a string", f"{path}.image_url")
            images.append((path, load_image_url(url, limits, f"{path}.image_url")))
        else:
            raise RequestError(400, f"{path}: expected a text part" + (" or an image_url part" if images is not None
                                                                         else "") + f", got {kind!r}", path)
    return " ".join(t for t in texts if t)


def load_image_url(url: str, limits: ImageLimits, param: str = "image_url") -> Image.Image:
    """An RGB image from a ``data:`` URL or a local file under ``limits.allowed_root``."""
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"{param}: a data URL must be data:<mime>;base64,<data>", param, "invalid_image_url")
        if math.ceil(len(data) * 3 / 4) > limits.max_bytes + 3:
            raise RequestError(413, f"{param}: the image is over {limits.max_bytes:,} bytes", param, "image_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"{param}: corrupt base64 data ({e})", param, "invalid_base64") from e
        return _decode_image(raw, limits, param, "the data URL")
    scheme = urlparse(url).scheme
    if scheme in ("http", "https", "ftp"):
        raise RequestError(400, f"{param}: remote URLs are not fetched; send a data URL or a path under the allowed "
                           "root", param, "invalid_image_url")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    if limits.allowed_root is None:
        raise RequestError(403, f"{param}: local files are not served (start the server with --allowed-root DIR)",
                           param, "path_not_allowed")
    root = limits.allowed_root.resolve()
    resolved = (root / path if not path.is_absolute() else path).resolve()
    if not resolved.is_relative_to(root):
        raise RequestError(403, f"{param}: {path} is outside the allowed root {root}", param, "path_not_allowed")
    if not resolved.is_file():
        raise RequestError(400, f"{param}: no such file: {path}", param, "invalid_image_url")
    if resolved.stat().st_size > limits.max_bytes:
        raise RequestError(413, f"{param}: {path} is over {limits.max_bytes:,} bytes", param, "image_too_large")
    return _decode_image(resolved.read_bytes(), limits, param, str(path))


def _decode_image(raw: bytes, limits: ImageLimits, param: str, what: str) -> Image.Image:
    if len(raw) > limits.max_bytes:
        raise RequestError(413, f"{param}: the image is over {limits.max_bytes:,} bytes", param, "image_too_large")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RequestError(413, f"{param}: {width}x{height} pixels is over the limit of {limits.max_pixels:,}",
                               param, "image_too_large")
        return image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{param}: {e}", param, "image_too_large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"{param}: {what} is not a readable image ({e})", param, "invalid_image") from e


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise RequestError(400, f"{name}: expected {expected}, got {value!r}", name)
