"""Opening one image safely: a pixel bound checked before decoding, deep images scaled.

Every place that turns a file (or bytes, or a PIL image) into pixels goes through
:func:`open_image`: the data sets, :meth:`Task.predict` and the HTTP service. It reads the
header first (Pillow opens lazily) and refuses an image whose width x height is over a
bound *before* decoding it, so an 18 KB PNG that claims 12000 x 12000 pixels costs
nothing; it turns every failure of Pillow (unknown format, truncated data, Pillow's own
decompression-bomb limit) into :class:`ImageError`, whose message names the image; it
turns the image upright as its EXIF orientation says (phone cameras store pixels sideways
and record the turn); and it scales 16-bit and float images to 8 bits instead of letting
``convert("RGB")`` saturate them.
"""

from __future__ import annotations

import io
import os
import re
import struct
from typing import IO, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inca.errors import ImageError, ImageTooLargeError

#: ``max_pixels`` that follows Pillow's own bound, ``PIL.Image.MAX_IMAGE_PIXELS`` at call
#: time (89.5 megapixels unless changed, about 0.25 GiB once decoded as RGB).
PILLOW_LIMIT = "pillow"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image

# What Pillow's plugins raise on malformed data (truncated, corrupt or lying headers).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
               TypeError, ZeroDivisionError, KeyError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def image_size(source: ImageSource, *, name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` from the image's header, without decoding its pixels (as stored:
    an EXIF orientation may swap them, never change their product).

    Raises:
        ImageError: the source is not a readable image (or over Pillow's hard limit).
    """
    name = _name(source, name)
    if isinstance(source, Image.Image):
        return source.size
    with _open_lazy(source, name) as im:
        return im.size


def check_pixels(size: tuple[int, int], limit: int | None, *, name: str,
                 fix: str = "pass a larger max_pixels") -> None:
    """Raise :class:`ImageTooLargeError` when ``width * height`` is over ``limit``.

    Args:
        size: ``(width, height)``.
        limit: the bound; ``None`` for none.
        name: the image, named in the message.
        fix: how to raise the bound, named in the message.
    """
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise ImageTooLargeError(
            f"image {name} is {size[0]}x{size[1]} = {_mp(pixels)} megapixels, over the limit "
            f"of {_mp(limit)} megapixels (a guard against decompression bombs); shrink the "
            f"image, or {fix}", name=name, size=size, pixels=pixels, limit=limit)


def open_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int | Literal["pillow"] | None = PILLOW_LIMIT) -> Image.Image:
    """An image as 8-bit RGB, its size checked before its pixels are decoded, upright as
    its EXIF orientation tag says (:func:`upright`).

    16-bit and float images are scaled to 8 bits rather than clipped, by the narrowest of
    the usual ranges that holds their values: ``0..1`` (floats only), ``0..255``,
    ``0..65535`` (``I;16*`` always; ``I`` when it fits, as Pillow stores 16-bit data);
    values outside all of these are stretched from the image's own min..max.

    Args:
        source: a path, the file's bytes, a binary file object, or a PIL image.
        name: how messages name the image (default: the path, or ``"image"``).
        max_pixels: largest ``width * height`` decoded: a number, ``"pillow"`` (Pillow's
            ``PIL.Image.MAX_IMAGE_PIXELS``, read at each call), or ``None`` for no bound of
            ours (Pillow's own refusal above twice its bound still applies).

    Raises:
        ImageTooLargeError: the image is over ``max_pixels`` (or Pillow's hard limit).
        ImageError: the source is not an image, or is truncated or corrupt.

    Example:
        >>> from inca.data.images import open_image
        >>> open_image("photo.png", max_pixels=40_000_000).mode  # doctest: +SKIP
        'RGB'
    """
    name = _name(source, name)
    if isinstance(max_pixels, str):  # PILLOW_LIMIT
        limit, fix = Image.MAX_IMAGE_PIXELS, "raise PIL.Image.MAX_IMAGE_PIXELS"
    else:
        limit, fix = max_pixels, "pass a larger max_pixels"
    if isinstance(source, Image.Image):
        check_pixels(source.size, limit, name=name, fix=fix)
        return to_rgb(upright(source), name)
    with _open_lazy(source, name) as im:
        check_pixels(im.size, limit, name=name, fix=fix)
        try:
            im.load()  # decode now: a truncated file fails here, not in a later pass
        except _BOMB_ERRORS as e:  # frames of an animation may be larger than the first
            raise _too_large(name, e) from None
        except _PIL_ERRORS as e:
            raise ImageError(f"cannot read image {name}: {_reason(e)}") from None
        return to_rgb(upright(im), name)


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation tag says (``ImageOps.exif_transpose``), so a
    phone photo stored sideways is trained on and served as it is viewed; ``im`` itself
    when it has no turn to make. Damaged EXIF data leaves the pixels as stored: the image
    decoded, its metadata is not worth refusing it for."""
    try:
        if im.getexif().get(0x0112, 1) not in range(2, 9):  # 1: as stored
            return im
        return ImageOps.exif_transpose(im)
    except _PIL_ERRORS:
        return im


def _open_lazy(source: ImageSource, name: str) -> Image.Image:
    """``Image.open`` (reads the header only) with Pillow's errors turned into ours."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    elif not isinstance(source, str | os.PathLike) and not hasattr(source, "read"):
        raise ImageError(f"cannot read image {name}: expected a path, bytes, a binary file "
                         f"or a PIL image, got {type(source).__name__}")
    try:
        return Image.open(source)
    except _BOMB_ERRORS as e:
        raise _too_large(name, e) from None
    except FileNotFoundError:
        raise ImageError(f"cannot read image {name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not an image format Pillow knows "
                         "(PNG, JPEG, WebP, TIFF, BMP, GIF, ...) or a damaged file") from None
    except _PIL_ERRORS as e:
        raise ImageError(f"cannot read image {name}: {_reason(e)}") from None


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB; deep (16-bit, int32, float) grey images scaled, not saturated."""
    try:
        if im.mode in _HIGH_BIT_MODES:
            return Image.fromarray(to_uint8(np.asarray(im))).convert("RGB")
        return im.convert("RGB")
    except _BOMB_ERRORS as e:
        raise _too_large(name, e) from None
    except _PIL_ERRORS as e:
        raise ImageError(f"cannot read image {name}: {_reason(e)}") from None


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Grey values ``(H, W)`` of any depth as uint8 (see :func:`open_image` for the ranges);
    NaN and infinities become 0."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # I;16*: the type's own range
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    x = a.astype(np.float32)  # one working copy, scaled in place
    bad = ~np.isfinite(x)
    if bad.any():
        x[bad] = np.nan
    lo, hi = (0.0, 0.0) if bad.all() else (float(np.nanmin(x)), float(np.nanmax(x)))
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        x *= 255
    elif lo >= 0 and hi <= 255:
        pass
    elif a.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        x /= 257
    elif hi > lo:  # no usual range fits: stretch the image's own range
        x -= lo
        x *= 255 / (hi - lo)
    else:
        x[:] = 0
    np.nan_to_num(x, copy=False, nan=0.0)
    np.rint(x, out=x)
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def _too_large(name: str, e: Exception) -> ImageTooLargeError:
    """Our error for Pillow's decompression-bomb refusal (it gives the pixel count only)."""
    limit = Image.MAX_IMAGE_PIXELS or 0
    if isinstance(e, Image.DecompressionBombError):
        limit *= 2  # Pillow refuses at twice MAX_IMAGE_PIXELS (and warns above it)
    found = re.search(r"\((\d+) pixels\)", str(e))
    pixels = int(found.group(1)) if found else None
    size = f"{_mp(pixels)} megapixels" if pixels is not None else "too many pixels"
    return ImageTooLargeError(
        f"image {name} has {size}, over Pillow's limit of {_mp(limit)} megapixels (a guard "
        "against decompression bombs); shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS",
        name=name, size=None, pixels=pixels, limit=limit)


def _name(source: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, str | os.PathLike):
        return str(source)
    label = getattr(source, "filename", "") or getattr(source, "name", "")
    return str(label) if isinstance(label, str | os.PathLike) and str(label) else \
        f"({type(source).__name__})"


def _reason(e: BaseException) -> str:
    """Pillow's message without object reprs (``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(e)).strip()
    return text or type(e).__name__


def _mp(pixels: int) -> str:
    """Megapixels, 3 significant digits (``144``, ``89.5``, ``0.0101``)."""
    return f"{pixels / 1e6:.3g}"
