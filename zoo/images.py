"""Images that users give, opened and checked in one place: what a vision expert can take, and where a data set's
image files may be read from.

An image the models cannot take raises `ImageError` naming it:

- a side under `MIN_IMAGE_SIDE` pixels (a 1x1 tracking pixel, a decode bug);
- more than `MAX_IMAGE_PIXELS` pixels, PIL's decompression-bomb limit (89,478,485: a 4 GiB RGB canvas / 16),
  checked from the header before anything is decoded; PIL itself only warns up to twice that;
- an empty (0-byte) file, a missing file, data PIL cannot identify or decode (truncated, corrupt);
- a pixel mode with no faithful RGB conversion: 16- and 32-bit integer and float pixels (``I``, ``I;16*``,
  ``F``: depth maps, scans), which PIL's conversion would clip to white above 255.

`resolve_image_path` keeps the paths a data file names under its image root: ``..``, an absolute path elsewhere
or a symlink pointing out is refused unless the caller allows it explicitly. Training turns these errors into
counted, logged skips (`zoo.train.conversations`); evaluation into an error naming the question (`zoo.eval`).
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from zoo.errors import UserError

MIN_IMAGE_SIDE = 2  # a 0- or 1-pixel side has no spatial content: an empty file, a tracking pixel, a decode bug
MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit (a 4 GiB RGB canvas / 16)
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # clipped to 255 by PIL's RGB conversion

ImageSource = str | Path | bytes | Image.Image


class ImageError(UserError, ValueError):
    """An image that cannot be used (see the module docstring); the message starts with the image's name."""


def check_image(image: Image.Image, name: str) -> None:
    """Size and mode checks that need only the header (no pixel is decoded); `ImageError` naming ``name``."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels is too small (each side must be at least "
                         f"{MIN_IMAGE_SIDE})")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: {image.width}x{image.height} pixels is too large, a decompression bomb (at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels); downscale it before use")
    if image.mode in HIGH_DEPTH_MODES:
        raise ImageError(f"{name}: pixel mode {image.mode!r} (16/32-bit or float pixels) has no faithful RGB "
                         "conversion (values above 255 would clip to white); save it as 8-bit RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL image -> RGB after `check_image`; transparent pixels are composited on white. Data that fails to
    decode (PIL decodes lazily, here) raises `ImageError`; a non-image raises ``TypeError``."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL.Image, got {type(image).__name__}")
    check_image(image, name)
    try:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # a bad file fails here with OSError, SyntaxError, zlib.error, ValueError, ...
        raise ImageError(f"{name}: cannot decode the image data ({type(e).__name__}: {e})") from e


def _name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    return "image bytes" if isinstance(source, bytes) else f"image {source}"


@contextmanager
def _opened(source: str | Path | bytes, name: str):
    """The image opened lazily (header read, pixels not decoded) and checked by `check_image`."""
    if isinstance(source, bytes) and not source or not isinstance(source, bytes) and _is_empty_file(source):
        raise ImageError(f"{name}: empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit: check_image refuses those
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError as e:
        raise ImageError(f"{name}: missing image file") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too large, a decompression bomb (at most {MAX_IMAGE_PIXELS:,} pixels; {e})") from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object for bytes: say it plainly
        raise ImageError(f"{name}: corrupt image or unsupported format (PIL cannot identify it)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: corrupt image or unsupported format ({e})") from e
    with image:
        check_image(image, name)
        yield image


def _is_empty_file(path: str | Path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False  # missing: Image.open says so


def probe_image(source: str | Path | bytes, name: str | None = None) -> None:
    """Check a file or encoded bytes from the header alone (empty, unidentifiable, size, mode): cheap enough for
    every record of a data set. Pixel data is decoded (and a truncated file found) only by `open_image`."""
    with _opened(source, _name(source, name)):
        pass


def open_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """An RGB image, fully decoded, from a path, encoded bytes or a PIL image; anything the models cannot take
    raises `ImageError` naming ``name`` (default: the path, or "image bytes")."""
    name = _name(source, name)
    if isinstance(source, Image.Image):
        return to_rgb(source, name)
    with _opened(source, name) as image:
        return to_rgb(image, name)


def resolve_image_path(path: str | Path, root: str | Path, allow_outside: bool = False) -> Path:
    """``root / path``, refused (`ImageError`) when it leaves ``root`` (see `check_under_root`) unless
    ``allow_outside``."""
    joined = Path(root) / path  # an absolute `path` replaces the root
    if not allow_outside:
        check_under_root(joined, root, shown=path)
    return joined


def check_under_root(path: str | Path, root: str | Path, shown: str | Path | None = None) -> None:
    """`ImageError` naming ``shown`` (default ``path``) when ``path`` is not inside ``root``: ``..`` components, an
    absolute path elsewhere, or a symlink (of the file or of a folder on the way) pointing outside."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real == real_root or real_root in real.parents:
        return
    lexical = Path(os.path.normpath(path)).is_relative_to(os.path.normpath(root))
    raise ImageError(f"image {shown if shown is not None else path}: {'a symlink pointing' if lexical else 'a path'} "
                     f"outside the image root {root} (to {real}); refused unless allowed "
                     "(allow_outside_image_root / --allow-outside-image-root)")
