"""Image files the models cannot take, written byte by byte for the bad-data tests: each kind with the words its
error or skip reason carries (`zoo.images`)."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

from PIL import Image


def png(size=(64, 64), colour=(200, 30, 30), mode="RGB") -> bytes:
    """An encoded PNG of one colour."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: tens of KB that decode to ``side``^2 pixels. 12000
    (144M pixels) is past the zoo's limit but under twice PIL's, where PIL only warns; 14000 is past both."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


# name -> (encoded bytes, words of its reason)
UNUSABLE = {
    "one-pixel": (lambda: png((1, 1)), "1x1 pixels is too small"),
    "zero-bytes": (lambda: b"", "empty image file (0 bytes)"),
    "bomb-warned": (lambda: bomb_png(12000), "12000x12000 pixels is too large"),  # PIL alone would decode it
    "bomb": (lambda: bomb_png(14000), "too large, a decompression bomb"),
    "sixteen-bit": (lambda: png((64, 64), 1000, "I;16"), "pixel mode 'I;16'"),
}


def write_unusable(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each unusable kind as ``folder/<kind>.png``: kind -> (path, reason words)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind, (data, words) in UNUSABLE.items():
        path = folder / f"{kind}.png"
        path.write_bytes(data())
        out[kind] = (path, words)
    return out
