"""Decode one image file into an RGB picture, or say in a few words why it cannot be used.

Every failure becomes a :class:`~tlopt.errors.BadImage` whose ``reason`` is short enough to
print beside the file name ("truncated image data", "empty file"); Pillow's own exceptions
never escape, because a user's folder holds whatever a camera, a scraper or a crash left there.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlopt.errors import BadImage

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""File suffixes read as images (compared in lower case); other files are ignored."""

# Modes that carry an alpha channel; they are composited on white, the usual page colour,
# rather than having the alpha dropped (which shows whatever colour hid under transparency).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PIXELS_IN_MESSAGE = re.compile(r"\((\d+) pixels\)")
# In JPEG entropy data, 0xFF is followed by 0x00 (stuffing), 0xD0..0xD7 (restart) or 0xFF
# (fill); any other byte after 0xFF is a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# First bytes of the formats in IMAGE_SUFFIXES: a file that starts like one but does not open is
# a damaged image rather than some other kind of file.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
# DHT, SOS, DQT, DRI, COM and APPn: what may sit between the scans of a progressive JPEG.
_SEGMENTS_BETWEEN_SCANS = frozenset({0xC4, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})


def is_image_file(path: Path | str) -> bool:
    """Whether ``path`` has one of the :data:`IMAGE_SUFFIXES` (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextlib.contextmanager
def bomb_guard() -> Iterator[None]:
    """Silence Pillow's DecompressionBombWarning while decoding; the size check refuses instead.

    :func:`decode_rgb` checks the size against ``Image.MAX_IMAGE_PIXELS`` itself and raises
    :class:`BadImage`, so the warning would only be noise. Warning filters are process-global and
    ``warnings.catch_warnings`` is not thread-safe: enter this once, on the calling thread,
    around a pool of threads that call :func:`decode_rgb`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def load_rgb(path: Path) -> Image.Image:
    """Read an image file and return it decoded, upright and in RGB mode.

    Args:
        path: the image file (symlinks are followed).

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        BadImage: the file cannot be read or decoded; ``reason`` says why in a few words.

    Example:
        >>> load_rgb(Path("flowers/rose/0001.jpg")).size  # doctest: +SKIP
        (500, 375)
    """
    with bomb_guard():
        return decode_rgb(read_bytes(path), str(path))[0]


def read_bytes(path: Path) -> bytes:
    """Read a whole file, turning OS errors (permissions, symlink loops) into :class:`BadImage`."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        # strerror is the short human text ("Permission denied", "Too many levels of symbolic
        # links"); it is None for a few OSErrors raised from Python code, hence the fallback.
        raise BadImage(str(path), (exc.strerror or str(exc)).lower()) from None


def decode_rgb(data: bytes, name: str) -> tuple[Image.Image, str]:
    """Decode image bytes into an upright RGB picture.

    Args:
        data: the file's bytes (callers hash the same bytes, so each file is read once).
        name: the name used in error messages, usually the path.

    Returns:
        The RGB image and the mode the file was stored in (``"CMYK"``, ``"I;16"``...).

    Raises:
        BadImage: empty, not an image, truncated, corrupt, or above Pillow's pixel limit.
    """
    if not data:
        raise BadImage(name, "empty file")
    img = _open_checked(data, name)
    try:
        img.load()
    # Pillow raises many kinds of exception on damaged files (OSError, SyntaxError,
    # struct.error, ValueError, ...): any failure while decoding means the file is unusable.
    except Exception as exc:
        raise BadImage(name, _damage_reason(exc, "corrupt image data")) from None
    if img.format == "JPEG" and not _jpeg_reaches_end(data):
        # libjpeg decodes damaged entropy data into noise without an error; a broken marker
        # structure is the sign Pillow does not check.
        raise BadImage(name, "corrupt image data (JPEG has no valid end-of-image marker)")
    mode = img.mode
    return to_rgb(_upright(img), name), mode


def _jpeg_reaches_end(data: bytes) -> bool:
    """Whether a JPEG's marker segments lead, scan by scan, to its end-of-image marker.

    Segments before the first scan are skipped by their length (so thumbnails inside EXIF do
    not count); after a scan, only the segments a progressive JPEG may carry can follow.
    Bytes after the end marker (some cameras append data) are allowed.
    """
    pos, scanned = 2, False  # after the start-of-image marker
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return True
        if scanned and marker not in _SEGMENTS_BETWEEN_SCANS:
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return False
            pos, scanned = found.start(), True
    return False


def _open_checked(data: bytes, name: str) -> Image.Image:
    """Open (header only) and refuse images above Pillow's decompression-bomb limit."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(name, _too_large_reason(_size_from_bomb_error(exc), str(exc))) from None
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_MAGIC):
            raise BadImage(name, "corrupt image header") from None
        raise BadImage(name, "not an image (cannot identify format)") from None
    except Exception as exc:
        raise BadImage(name, _damage_reason(exc, "corrupt image header")) from None
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise BadImage(name, _too_large_reason((width, height), ""))
    return img


def _damage_reason(exc: Exception, what: str) -> str:
    """ "truncated image data" when the file ends early, else ``what`` and Pillow's words."""
    if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
        return "truncated image data"
    return f"{what} ({type(exc).__name__}: {exc})"


def _size_from_bomb_error(exc: BaseException) -> tuple[int, int] | None:
    """The (width, height) Pillow was checking when it raised DecompressionBombError.

    Pillow's message gives only the pixel count; the opened image is still a local ``im`` in
    the frame that raised, so the traceback gives the width and height. ``None`` if not found.
    """
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("im")
        if isinstance(candidate, Image.Image):
            return candidate.size
        tb = tb.tb_next
    return None


def _too_large_reason(size: tuple[int, int] | None, message: str) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    if size is not None:
        what = f"{size[0]} x {size[1]} pixels"
    else:
        match = _PIXELS_IN_MESSAGE.search(message)
        what = f"{match.group(1)} pixels" if match else "too many pixels"
    return f"too large ({what}, above Pillow's limit of {limit})"


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as viewers do; keep the image as stored if EXIF is bad."""
    try:
        return ImageOps.exif_transpose(img)
    # A damaged EXIF block should not cost the picture: the pixels decoded fine.
    except Exception:
        return img


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to RGB without losing the picture.

    Transparent pixels become white; 16-bit and 32-bit greys are scaled to 0..255 (a plain
    ``convert`` clips them, turning most 16-bit photos white); CMYK, palette, 1-bit and grey go
    through Pillow's conversions.

    Raises:
        BadImage: Pillow has no conversion from this mode to RGB.
    """
    if img.mode == "RGB":
        return img
    try:
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            return _on_white(img.convert("RGBA"))
        if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
            return Image.fromarray(_grey_to_uint8(np.asarray(img)), mode="L").convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadImage(name, f"unsupported colour mode {img.mode} ({exc})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float grey image onto 0..255.

    Unsigned 16-bit data spans 0..65535, so it is divided by 257 (65535 / 255, exact for the
    endpoints). Mode ``I`` and ``F`` have no fixed range: data already in 0..255 (or 0..1 for
    floats) keeps its meaning, 0..65535 is read as 16-bit, anything else is stretched min..max.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if values.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = data * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = data
    elif low >= 0.0 and high <= 65535.0:
        scaled = data / 257.0
    else:
        scaled = (data - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and cut the centre square.

    Args:
        img: any Pillow image (converted to RGB first if needed).
        size: the side of the square, in pixels.

    Returns:
        A ``uint8`` array of shape ``(size, size, 3)``.

    Example:
        >>> resize_square(Image.new("RGB", (400, 300)), 224).shape
        (224, 224, 3)
    """
    if size < 1:
        raise ValueError(f"size must be at least 1 but got {size}")
    # torchvision's Resize(size) + CenterCrop(size) themselves, so that cached batches equal
    # the usual pipeline's (tests/test_pipeline.py pins it). On a PIL image, Resize is Pillow's
    # BILINEAR, which widens its filter when shrinking (antialiasing). Imported here because
    # 'tlopt data check' never resizes and so starts without torch.
    from torchvision.transforms.v2 import functional as tvf

    resized = tvf.resize(to_rgb(img), [size], interpolation=tvf.InterpolationMode.BILINEAR)
    square = tvf.center_crop(resized, [size, size])
    return np.asarray(square, dtype=np.uint8).reshape(size, size, 3)
