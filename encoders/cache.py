"""A disk cache of frozen vision features, so align-stage training reads features instead of running the experts.

>>> cache = FeatureCache("cache/", model.vision)          # one folder per tower: config + weights fingerprint
>>> cache.add(images, batch_size=64)                       # encodes only the images not cached yet
>>> feats = cache.get(images)                              # [N, L, C] (a list of them for sequence fusion)
>>> feats = cache.get(stream_images, add_missing=True)     # encodes what is missing, written shard by shard

Entries are keyed by the image's content (a hash of its mode, size and pixels) inside a folder named by the tower's
fingerprint (its resolved config and the bytes of its weights), so a changed expert never reads stale features.
Features are stored as safetensors shards written atomically (temporary file, then rename) with a JSON index
rewritten after each shard: a crash loses at most the shard being written. Cached features are bitwise the live
ones: the same tower in eval mode computes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.config import to_dict

from .fusion import FusedVision

INDEX = "index.json"


def image_key(image: Image.Image) -> str:
    """Content hash of a PIL image (mode, size and pixel bytes): equal pictures share cached features."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL.Image, got {type(image).__name__}")
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


def tower_fingerprint(tower: nn.Module) -> str:
    """Hash of a vision tower's resolved config and the bytes of its weights and buffers."""
    resolved = tower.resolved_config()
    config = [to_dict(c) for c in resolved] if isinstance(resolved, list) else to_dict(resolved)
    if isinstance(tower, FusedVision):
        config = {"experts": config, "fusion": to_dict(tower.fusion)}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureCache:
    """Features of one frozen vision tower (`VisionExpert` or `FusedVision`) under ``root/<fingerprint>/``."""

    def __init__(self, root: str | Path, tower: nn.Module, shard_size: int = 1024):
        self.tower = tower
        self.fingerprint = tower_fingerprint(tower)
        self.dir = Path(root) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.sequence = isinstance(tower, FusedVision) and tower.fusion.mode == "sequence"
        index_path = self.dir / INDEX
        self.index: dict[str, list] = {}
        if index_path.exists():
            try:
                self.index = json.loads(index_path.read_text())["entries"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index_path}: not a feature-cache index ({e}); delete the folder to rebuild") from e
        self._shards: dict[str, dict[str, torch.Tensor]] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}  # encoded by get(add_missing=True), not yet in a shard

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image: Image.Image) -> bool:
        return image_key(image) in self.index

    @torch.no_grad()
    def add(self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool = False) -> int:
        """Encode and store the images not cached yet (duplicates encoded once); returns how many were added."""
        todo = self._missing(images)
        keys = list(todo)
        starts: Iterable[int] = range(0, len(keys), self.shard_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="caching features", unit="shard")
        for start in starts:
            chunk = keys[start:start + self.shard_size]
            self._write_shard(chunk, self._encode([todo[k] for k in chunk], batch_size))
        return len(keys)

    def _missing(self, images: Sequence[Image.Image], keys: Sequence[str] | None = None) -> dict[str, Image.Image]:
        todo: dict[str, Image.Image] = {}
        for key, image in zip(keys if keys is not None else self._keys(images), images):
            if key not in self.index and key not in self._pending:
                todo.setdefault(key, image)
        return todo

    @staticmethod
    def _keys(images: Sequence[Image.Image]) -> list[str]:
        keys = []
        for i, image in enumerate(images):
            try:
                keys.append(image_key(image))
            except TypeError as e:
                raise TypeError(f"image {i}: {e}") from e
        return keys

    @torch.no_grad()
    def _encode(self, images: list[Image.Image], batch_size: int = 64) -> list[torch.Tensor]:
        """Per expert part, ``[N, L, C]`` features of ``images`` on the CPU (the tower in eval mode)."""
        was_training = self.tower.training
        self.tower.eval()
        param = next(self.tower.parameters())
        parts: list[list[torch.Tensor]] = []
        try:
            for b in range(0, len(images), batch_size):
                pixels = self.tower.preprocess(images[b:b + batch_size])
                if isinstance(pixels, dict):
                    out = self.tower({k: v.to(param.device) for k, v in pixels.items()})
                else:
                    out = self.tower(pixels.to(param.device, param.dtype))
                parts.append([t.cpu() for t in (out if isinstance(out, list) else [out])])
        finally:
            self.tower.train(was_training)
        return [torch.cat(p) for p in zip(*parts)]

    def flush(self) -> None:
        """Write the features `get` encoded on the fly (``add_missing``) as a shard."""
        if self._pending:
            keys = list(self._pending)
            self._write_shard(keys, [torch.stack(p) for p in zip(*(self._pending[k] for k in keys))])
            self._pending = {}

    def _write_shard(self, keys: list[str], tensors: list[torch.Tensor]) -> None:
        name = f"shard-{len({s for s, _ in self.index.values()}):05d}.safetensors"
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        save_file({f"features.{i}": t.contiguous() for i, t in enumerate(tensors)}, str(tmp),
                  metadata={"tower": self.fingerprint, "count": str(len(keys))})
        os.replace(tmp, path)
        for row, key in enumerate(keys):
            self.index[key] = [name, row]
        _atomic_write_text(self.dir / INDEX, json.dumps({"tower": self.fingerprint, "entries": self.index}))

    def _shard(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._shards:
            path = self.dir / name
            try:
                self._shards[name] = load_file(str(path))
            except Exception as e:  # OSError, or safetensors' own error on a truncated or foreign file
                raise ValueError(f"{path}: cannot read cached features ({e}); delete it and its index to rebuild") from e
        return self._shards[name]

    def get(self, images: Sequence[Image.Image], add_missing: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Cached features of ``images``: ``[N, L, C]`` (a list of per-expert tensors for sequence fusion).
        An image not in the cache is an error naming its position (call `add` first), unless ``add_missing``: it
        is then encoded now and kept, written with others as a shard of ``shard_size`` (and by `flush`)."""
        if not images:
            raise ValueError("images: nothing to read")
        return self.lookup(self.keep(images) if add_missing else self._keys(images))

    def keep(self, images: Sequence[Image.Image]) -> list[str]:
        """The `image_key` of each image, encoding the ones not cached yet (kept as `get` with ``add_missing`` keeps
        them); `lookup` reads their features by these keys."""
        keys = self._keys(images)
        todo = self._missing(images, keys)
        if todo:
            for key, *parts in zip(todo, *self._encode(list(todo.values()))):
                self._pending[key] = parts
            if len(self._pending) >= self.shard_size:
                self.flush()
        return keys

    def lookup(self, keys: Sequence[str]) -> torch.Tensor | list[torch.Tensor]:
        """Cached features by `image_key` (as `get`, for callers that keep the keys of images they have seen)."""
        per_image = []
        for i, key in enumerate(keys):
            if key in self._pending:
                per_image.append(self._pending[key])
            elif key in self.index:
                name, row = self.index[key]
                shard = self._shard(name)
                per_image.append([shard[f"features.{p}"][row] for p in range(len(shard))])
            else:
                raise KeyError(f"image {i}: not in the feature cache {self.dir} (call add() first)")
        out = [torch.stack(part) for part in zip(*per_image)]
        return out if self.sequence else out[0]
