"""Conversation data for instruction tuning: LLaVA JSON and webdataset sources, chat templates, labels on assistant
turns only, and bad data as counted, logged skips.

>>> source = read_llava_json("llava_instruct.json", image_root="images/")
>>> data = ConversationStream(model, [source], template="vicuna_v1")
>>> loader = DataLoader(data, batch_size=16, collate_fn=data.collate)

A sample is a `Conversation`: an id, its images (paths, bytes or PIL images; none for text-only samples) and turns
``user`` / ``assistant`` (LLaVA's ``human`` / ``gpt``). Templates (`TEMPLATES`): ``plain`` (LLaVA's pretraining
format: the image, then the caption), ``vicuna_v1`` (LLaVA-1.5), ``chat_template`` (the tokenizer's own), ``zoo``
(the model config's ``prompt`` for the first question, later turns appended). Every encoded sample keeps at least one
supervised token, or it is skipped and counted with its id and the reason.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from zoo.errors import DataFileError
from zoo.images import ImageError, open_image, probe_image, resolve_image_path
from zoo.model import IGNORE_INDEX, ZooModel, pad_token_ids
from zoo.registry import Registry

from .data import SkipCounter

log = logging.getLogger(__name__)
_MEMO_SIZE = 1 << 20  # entries per ConversationStream memo (token ids, image keys): bounds memory on huge corpora

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


class BadSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is what the skip counter records."""


@dataclass
class Conversation:
    """One training sample: ``turns`` are ``(role, text)`` with role ``system`` / ``user`` / ``assistant``; ``images``
    are paths, raw bytes or PIL images, one per ``<image>`` placeholder in the text, in order; ``labels``: facts
    known about the sample by task (easy-vqa captions: ``colour``, ``shape``), which probes read."""

    id: str
    turns: list[tuple[str, str]]
    images: list[str | Path | bytes | Image.Image] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Encoded:
    """Token ids and labels (``IGNORE_INDEX`` outside the supervised spans) of one conversation."""

    input_ids: list[int]
    labels: list[int]


def parse_llava_record(record: dict, image_root: str | Path | None = None, where: str = "",
                       allow_outside_root: bool = False) -> Conversation:
    """A LLaVA JSON record (``id``, optional ``image`` path or list, ``conversations`` of ``from``/``value``) as a
    `Conversation`; a malformed record raises `BadSample` naming the field. Image paths are taken relative to
    ``image_root``; one that leaves it (``..``, an absolute path elsewhere, a symlink out) raises `BadSample` unless
    ``allow_outside_root``."""
    if not isinstance(record, dict):
        raise BadSample(f"{where}: expected a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", where))
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("no 'conversations' list")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample(f"conversations[{i}]: expected {{'from': ..., 'value': str}}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadSample(f"conversations[{i}].from: unknown role {turn.get('from')!r} (human | gpt | system)")
        parsed.append((role, turn["value"]))
    image = record.get("image")
    images = [] if image is None else image if isinstance(image, list) else [image]
    if image_root is not None:
        try:
            images = [resolve_image_path(p, image_root, allow_outside_root) if isinstance(p, str) else p
                      for p in images]
        except ImageError as e:
            raise BadSample(str(e)) from e
    return Conversation(sample_id, parsed, images)


def read_llava_json(path: str | Path, image_root: str | Path | None = None,
                    skipped: SkipCounter | None = None, allow_outside_root: bool = False) -> list[Conversation]:
    """Conversations of a LLaVA JSON file (one array) or JSON-lines file. A malformed line or record, or an image
    path that leaves ``image_root`` (default: the file's folder) without ``allow_outside_root``, is skipped and
    counted (id ``file:line`` when it has none); a file that is not JSON at all is an error naming it."""
    path = Path(path)
    image_root = path.parent if image_root is None else image_root
    skipped = skipped if skipped is not None else SkipCounter()
    text = path.read_text()
    out = []
    if text.lstrip().startswith("["):
        try:
            records = [(f"{path.name}:{i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON ({e})") from e
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                skipped.skip(f"malformed JSON line ({e.msg})", f"{path.name}:{n}")
    for where, record in records:
        try:
            out.append(parse_llava_record(record, image_root, where, allow_outside_root))
        except BadSample as e:
            skipped.skip(str(e), str(record.get("id", where)) if isinstance(record, dict) else where)
    return out


def load_image(image: str | Path | bytes | Image.Image) -> Image.Image:
    """An RGB image from a path, raw bytes or a PIL image, fully decoded (corrupt bytes fail here, not later); one
    the models cannot take (`zoo.images`: missing, empty, corrupt, too small, a decompression bomb, 16-bit or float
    pixels) raises `BadSample` naming the file."""
    try:
        return open_image(image)
    except ImageError as e:
        raise BadSample(str(e)) from e


# --------------------------------------------------------------------------------------------- templates
TEMPLATES: Registry[Callable] = Registry("conversation template")


def _spans_to_labels(pieces: list[tuple[list[int], bool]]) -> Encoded:
    ids, labels = [], []
    for tokens, supervised in pieces:
        ids += tokens
        labels += tokens if supervised else [IGNORE_INDEX] * len(tokens)
    return Encoded(ids, labels)


def _text(tokenizer, text: str, bos: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=bos).input_ids


@TEMPLATES.register("plain")
def plain_template(model: ZooModel, turns: list[tuple[str, str]]) -> Encoded:
    """LLaVA pretraining: the image placeholder(s) of the first user turn, then the first answer (+ EOS) as the
    target; instructions are dropped."""
    tok = model.tokenizer
    user = next((t for r, t in turns if r == "user"), "")
    answer = next((t for r, t in turns if r == "assistant"), None)
    if answer is None:
        raise BadSample("no assistant turn")
    image = model.config.tokenizer.image_token
    prefix = _text(tok, image * user.count(image), bos=True)
    return _spans_to_labels([(prefix, False), (_text(tok, answer) + [tok.eos_token_id], True)])


@TEMPLATES.register("vicuna_v1")
def vicuna_template(model: ZooModel, turns: list[tuple[str, str]]) -> Encoded:
    """LLaVA-1.5's ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``; labels on each answer + ``</s>``."""
    tok = model.tokenizer
    system = next((t for r, t in turns if r == "system"), VICUNA_SYSTEM)
    pieces: list[tuple[list[int], bool]] = [(_text(tok, system, bos=True), False)]
    for role, text in turns:
        if role == "user":
            pieces.append((_text(tok, f" USER: {text} ASSISTANT:"), False))
        elif role == "assistant":
            pieces.append((_text(tok, f" {text}") + [tok.eos_token_id], True))
    return _spans_to_labels(pieces)


@TEMPLATES.register("zoo")
def zoo_template(model: ZooModel, turns: list[tuple[str, str]]) -> Encoded:
    """The model config's ``prompt`` for the first user turn (as ``answer()`` uses it); later turns follow as
    ``question answer</s>`` (the easy-vqa multi-turn layout)."""
    tok = model.tokenizer
    pieces: list[tuple[list[int], bool]] = []
    first = True
    for role, text in turns:
        if role == "user":
            if first:
                image = model.config.tokenizer.image_token
                question = text.replace(image, "").strip()
                prompt = model.config.prompt.format(question=question)
                if not text.count(image):  # a text-only sample: the prompt's image slot stays empty
                    prompt = prompt.replace(image + "\n", "").replace(image, "")
                elif image in prompt and text.count(image) > 1:
                    prompt = prompt.replace(image, image * text.count(image), 1)
                pieces.append((tok(prompt).input_ids, False))
                first = False
            else:
                pieces.append((_text(tok, text), False))
        elif role == "assistant":
            pieces.append((model.encode_answer(text), True))
    return _spans_to_labels(pieces)


@TEMPLATES.register("chat_template")
def chat_template(model: ZooModel, turns: list[tuple[str, str]]) -> Encoded:
    """The tokenizer's own chat template; each assistant message's tokens are found by rendering the conversation up
    to it (with the generation prompt) and through it, which needs a prefix-stable template (checked)."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ValueError("template: 'chat_template' needs a tokenizer with a chat template")
    messages = [{"role": r, "content": t} for r, t in turns]

    def render(msgs, generation):
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5

    ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if ids[:end] != render(messages[: i + 1], False):
            raise ValueError("template: the tokenizer's chat template is not prefix-stable; use another template")
        labels[start:end] = ids[start:end]
    return Encoded(ids, labels)


def encode_conversation(model: ZooModel, sample: Conversation, template: str = "vicuna_v1") -> Encoded:
    """Token ids and labels of one conversation, truncated to ``model.config.max_length`` after image expansion.

    Raises `BadSample` (reason for the skip counter) for: no assistant turn, an empty question, placeholders that do
    not match the images (one image and no placeholder: the placeholder goes in front of the first question, as
    LLaVA does), a placeholder or every supervised token cut by truncation.
    """
    turns = list(sample.turns)
    image = model.config.tokenizer.image_token
    if not any(r == "assistant" for r, _ in turns):
        raise BadSample("no assistant turn")
    if any(r == "user" and not t.replace(image, "").strip() and template != "plain" for r, t in turns):
        raise BadSample("empty question")
    placeholders = sum(t.count(image) for _, t in turns)
    if placeholders == 0 and len(sample.images) == 1:
        first = next(i for i, (r, _) in enumerate(turns) if r == "user") if any(r == "user" for r, _ in turns) else None
        if first is None:
            raise BadSample("an image but no user turn to place it in")
        turns[first] = ("user", f"{image}\n{turns[first][1]}")
        placeholders = 1
    if placeholders != len(sample.images):
        raise BadSample(f"{placeholders} <image> placeholder(s) for {len(sample.images)} image(s)")
    encoded = TEMPLATES.get(template, field="template")(model, turns)
    image_id = model.image_token_id
    budget = model.config.max_length - len(sample.images) * (model.num_image_tokens - 1)
    ids, labels = encoded.input_ids[:budget], encoded.labels[:budget]
    if ids.count(image_id) != len(sample.images):
        raise BadSample(f"over-long: truncation to max_length {model.config.max_length} cuts an image placeholder")
    if all(v == IGNORE_INDEX for v in labels[1:]):
        raise BadSample(f"over-long: no supervised token left after truncation to max_length "
                        f"{model.config.max_length}")
    return Encoded(ids, labels)


# --------------------------------------------------------------------------------------------- webdataset
def _image_bytes(image: str | Path | bytes | Image.Image) -> bytes:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        probe_image(data, "image bytes" if isinstance(image, bytes) else f"image {image}")
    except OSError as e:
        raise BadSample(f"image {image}: missing image file") from e
    except ImageError as e:
        raise BadSample(str(e)) from e
    return data


def write_webdataset(samples: Iterable[Conversation], pattern: str, maxcount: int = 1000,
                     skipped: SkipCounter | None = None) -> int:
    """Write conversations as webdataset shards (``pattern`` like ``out/shard-%05d.tar``): per sample ``json``
    (id, conversations) and its images as ``0.img``, ``1.img``, ... (the original encoded bytes, whose header is
    checked but not decoded here). A sample whose image file cannot be read or used (`zoo.images.probe_image`) is
    skipped and counted. Returns the number written."""
    import webdataset as wds

    skipped = skipped if skipped is not None else SkipCounter()
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            try:
                images = {f"{i}.img": _image_bytes(im) for i, im in enumerate(sample.images)}
            except BadSample as e:
                skipped.skip(str(e), sample.id)
                continue
            record = {"__key__": f"{n:09d}", "json": json.dumps({
                "id": sample.id, "conversations": [{"from": r, "value": t} for r, t in sample.turns]}).encode()}
            sink.write({**record, **images})
            n += 1
    return n


def shard_urls(urls: str | Sequence[str]) -> list[str]:
    """The shard urls of a webdataset source: brace patterns (``train-{00000..00003}.tar``) and ``::`` lists
    expanded as webdataset expands them."""
    from webdataset.shardlists import expand_urls

    return [u for url in ([urls] if isinstance(urls, str) else urls) for u in expand_urls(url)]


def _tar_complete(path: Path) -> bool:
    """Whether a tar file ends with its end-of-archive marker (two zero blocks): a file cut at a member boundary
    reads without an error, so the missing marker is what tells it was truncated."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 1024:
                return False
            f.seek(-1024, os.SEEK_END)
            return f.read(1024) == bytes(1024)
    except OSError:
        return False


def read_webdataset(urls: str | Sequence[str], skipped: SkipCounter | None = None) -> Iterator[Conversation]:
    """Conversations from webdataset shards written by `write_webdataset` (or LLaVA-style shards with ``json`` +
    ``jpg``/``png``), shard by shard, so that a truncated or unreadable shard is skipped and counted under its own
    url (a local shard without its end-of-archive marker counts as truncated even where the tar reads cleanly up to
    the cut); a malformed record is skipped and counted under its key, an image the models cannot take (checked from
    its header: empty, unidentifiable, too small, a decompression bomb, 16-bit pixels) under its shard member
    (``shard:key.member``); reading goes on."""
    import webdataset as wds

    skipped = skipped if skipped is not None else SkipCounter()
    for url in shard_urls(urls):
        failed = []

        def on_error(exn: Exception, url: str = url, failed: list = failed) -> bool:
            failed.append(exn)
            skipped.skip(f"unreadable shard data ({type(exn).__name__}: truncated or corrupt tar)", url)
            return True  # keep going with the next shard

        for raw in wds.WebDataset(url, handler=on_error, shardshuffle=False, empty_check=False):
            key = f"{raw.get('__url__', url)}:{raw.get('__key__', '?')}"
            try:
                record = json.loads(raw["json"])
                sample = parse_llava_record(record, where=key)
            except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
                skipped.skip(f"malformed JSON record ({type(e).__name__})", key)
                continue
            except BadSample as e:
                skipped.skip(str(e), key)
                continue
            members = sorted(k for k in raw if k.endswith(".img")) or [k for k in ("jpg", "png", "jpeg") if k in raw][:1]
            try:  # header checks now, naming the shard member; the pixels are decoded when the sample is encoded
                for member in members:
                    probe_image(raw[member], f"image {key}.{member}")
            except ImageError as e:
                skipped.skip(str(e), sample.id)
                continue
            sample.images = [raw[member] for member in members]
            yield sample
        local = Path(url[5:] if url.startswith("file:") else url)
        if not failed and local.is_file() and not _tar_complete(local):
            skipped.skip("truncated shard (no end-of-archive marker)", url)


# --------------------------------------------------------------------------------------------- the stream
class ConversationStream(IterableDataset):
    """Encoded training items from one or several sources of `Conversation` (lists or re-iterable callables),
    mixed with ``weights`` (default: in proportion to their sizes for lists, equal otherwise).

    Each item is ``(sample id, input_ids, labels, pixel_values of its images or None)`` (with ``features``, a
    `zoo.encoders.FeatureCache` of the model's frozen vision tower: the images' cached features instead of pixels,
    encoded once per distinct image and batched as ``image_features``); bad samples are skipped and
    counted in ``skipped`` (reason -> ids) and logged; if more than ``warn_ratio`` of the samples seen were skipped,
    a warning says so. Iterating once goes through every source once (``epochs`` times), sources drawn at random by
    weight (seeded) until all are exhausted.
    """

    def __init__(self, model: ZooModel, sources: Sequence[Sequence[Conversation] | Callable[[], Iterable]],
                 weights: Sequence[float] | None = None, template: str = "vicuna_v1", seed: int = 0,
                 epochs: int = 1, warn_ratio: float = 0.05, features=None):
        TEMPLATES.get(template, field="template")
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"weights: {len(weights)} weights for {len(sources)} sources")
        self.model, self.sources, self.template = model, list(sources), template
        self.weights = list(weights) if weights is not None else [
            float(len(s)) if hasattr(s, "__len__") else 1.0 for s in self.sources]
        self.seed, self.epochs, self.warn_ratio = seed, epochs, warn_ratio
        self.features = features
        self._encoded: dict[tuple, Encoded] = {}  # (turns, image count) -> token ids and labels (`encode`)
        self._image_keys: dict = {}  # (path, mtime, size) or id(PIL image) -> (weakref or None, cache key)
        self.skipped = SkipCounter()
        self.seen = 0
        self.start = {"raw": 0, "valid": 0, "valid_end": 0}  # where iteration begins (`load_state_dict`)
        self.report_position = False  # batches carry ``data_position`` (`fit` turns it on for checkpoints)

    def _iterate(self, source) -> Iterator[Conversation]:
        return iter(source() if callable(source) else source)

    def samples(self) -> Iterator[Conversation]:
        """The raw conversations in mixing order."""
        rng = random.Random(self.seed)
        for _ in range(self.epochs):
            live = [(self._iterate(s), w) for s, w in zip(self.sources, self.weights)]
            while live:
                i = rng.choices(range(len(live)), weights=[w for _, w in live])[0]
                try:
                    yield next(live[i][0])
                except StopIteration:
                    live.pop(i)

    def encode(self, sample: Conversation):
        """One item ``(id, input_ids, labels, pixels)``, or raises `BadSample`. Epochs repeat the same texts and
        images: the token ids of a conversation and, with ``features``, the cache key of an image file (valid while
        the file's size and modification time stay) are computed once per stream."""
        key = (tuple(map(tuple, sample.turns)), len(sample.images))
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = encode_conversation(self.model, sample, self.template)
            if len(self._encoded) < _MEMO_SIZE:
                self._encoded[key] = encoded
        pixels = None
        if sample.images:
            if self.features is not None:
                pixels = self.features.lookup([self._feature_key(im) for im in sample.images])
            else:
                pixels = self.model.vision.preprocess([load_image(im) for im in sample.images])
        return sample.id, encoded.input_ids, encoded.labels, pixels

    def _feature_key(self, image) -> str:
        """The feature-cache key of one image (encoded into the cache if it is not there yet). A file's key is kept
        while its size and modification time stay; an in-memory PIL image's while the object lives (sources such as
        easy-vqa share one decoded image between its questions; an image changed in place is not re-hashed)."""
        stamp = None
        if isinstance(image, (str, Path)):
            try:
                stat = os.stat(image)
                stamp = (str(image), stat.st_mtime_ns, stat.st_size)
            except OSError:
                pass  # load_image names the missing file
        elif isinstance(image, Image.Image):
            stamp = id(image)
        known = self._image_keys.get(stamp) if stamp is not None else None
        if known is not None and (known[0] is None or known[0]() is image):
            return known[1]
        key = self.features.keep([load_image(image)])[0]
        if stamp is not None:
            if len(self._image_keys) >= _MEMO_SIZE:
                self._image_keys.clear()
            ref = weakref.ref(image) if isinstance(image, Image.Image) else None
            self._image_keys[stamp] = (ref, key)
        return key

    def state_dict(self, position: dict | None = None) -> dict:
        """The resume state: ``position`` (a batch's ``data_position``: where the next unconsumed sample starts) and
        the skip counter."""
        return {"position": dict(position or self.start), "skipped": self.skipped.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the position of `state_dict`: earlier samples are passed over without being decoded."""
        self.start = {"raw": 0, "valid": 0, "valid_end": 0, **state["position"]}
        self.skipped.load_state_dict(state["skipped"])

    def __iter__(self):
        """Items ``(id, input_ids, labels, pixels, (raw index, valid index))``. Under ``torch.distributed`` each rank
        takes every world-size-th good sample, so one global batch holds the same samples whatever the number of
        ranks (every rank reads, and encodes, the whole stream); DataLoader workers split the raw samples."""
        info = torch.utils.data.get_worker_info()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        if info is not None and info.num_workers > 1 and self.start["raw"]:
            raise ValueError("resume: a ConversationStream resumes exactly only with num_workers 0")
        valid = self.start["valid"]
        for n, sample in enumerate(self.samples()):
            if n < self.start["raw"]:
                continue  # consumed before the checkpoint
            if info is not None and n % info.num_workers != info.id:
                continue  # DataLoader workers share the stream: each takes every num_workers-th sample
            self.seen += 1
            try:
                item = self.encode(sample)
            except BadSample as e:
                self.skipped.skip(str(e), sample.id)
                continue
            v, valid = valid, valid + 1
            if v >= self.start["valid_end"] and v % world == rank:
                yield (*item, (n, v))
        if self.seen and self.skipped.total > self.warn_ratio * self.seen:
            log.warning("%d of %d samples skipped (%s)", self.skipped.total, self.seen,
                        ", ".join(f"{k}: {len(v)}" for k, v in self.skipped.by_reason.items()))

    def collate(self, batch) -> dict:
        """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``, the images of the batch in placeholder
        order (text-only samples contribute none); with ``report_position``, ``data_position`` (where the stream
        continues after this batch; the training module pops it and checkpoints it)."""
        pad = self.model.tokenizer.pad_token_id
        input_ids, mask = pad_token_ids([item[1] for item in batch], pad, "right")
        labels, _ = pad_token_ids([item[2] for item in batch], IGNORE_INDEX, "right")
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.report_position:  # where the next batch starts, for exact resume (`state_dict`)
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            n, v = batch[-1][4]
            out["data_position"] = {"raw": n + 1, "valid": v + 1, "valid_end": (v // world + 1) * world}
        pixels = [item[3] for item in batch if item[3] is not None]
        key = "image_features" if self.features is not None else "pixel_values"
        if pixels:
            if isinstance(pixels[0], dict):
                out[key] = {k: torch.cat([p[k] for p in pixels]) for k in pixels[0]}
            elif isinstance(pixels[0], list):  # sequence-fused experts' cached features: one tensor per expert
                out[key] = [torch.cat(part) for part in zip(*pixels)]
            else:
                out[key] = torch.cat(pixels)
        return out


__all__ = ["BadSample", "Conversation", "ConversationStream", "TEMPLATES", "encode_conversation", "load_image",
           "parse_llava_record", "read_llava_json", "read_webdataset", "shard_urls", "write_webdataset"]
