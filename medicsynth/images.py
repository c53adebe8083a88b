"""Image checks and repair: every file a manifest references must be a plain 8-bit RGB JPEG.

NVIDIA DALI's JPEG decoder aborts the *whole* pipeline on one file it cannot decode (a GIF named
``.jpg``, a truncated download, a CMYK or lossless JPEG). :func:`inspect_image` sorts a file into

- ``ok``: an RGB JPEG with 8-bit baseline, extended-sequential or progressive Huffman coding that
  decodes completely; used as is.
- ``reencode``: a decodable image in another format, colour mode or JPEG coding; rewrite it with
  :func:`reencode_to_jpeg` (first frame, alpha composited on white, 16-bit scaled to 8-bit).
- ``reject``: missing, empty, truncated, corrupt, not an image, or of absurd size.

The format is taken from the file's content, never from its extension. Decoding is complete
(``Image.load()``) and ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: a truncated file
must be reported, not silently padded with grey.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from medicsynth.io import atomic_path

OK = "ok"
REENCODE = "reencode"
REJECT = "reject"

MIN_SIDE = 8
# Pillow's own decompression-bomb threshold; a larger MEDIC photo would be a broken header.
MAX_PIXELS = 89_478_485

# JPEG start-of-frame markers DALI's decoders handle: baseline, extended sequential and
# progressive Huffman. Lossless (C3), hierarchical (C5-C7) and arithmetic (C9-CF) are not.
_DALI_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Pillow calls a JPEG with a multi-picture (APP2 "MPF") index "MPO"; its first picture is an
# ordinary JPEG stream and decoders stop at its end-of-image marker.
_JPEG_FORMATS = {"JPEG", "MPO"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class ImageCheck:
    """What :func:`inspect_image` found.

    ``status`` is ``"ok"``, ``"reencode"`` or ``"reject"``. ``reason`` is a short token for
    counting (``""`` when ok), e.g. ``format_gif``, ``mode_cmyk``, ``jpeg_lossless``,
    ``truncated``, ``too_small``; ``detail`` is the human-readable explanation or error message.
    ``format``, ``mode`` and ``size`` (width, height) are ``None`` when the file could not be
    identified.
    """

    status: str
    reason: str
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def _reject(reason: str, detail: str, im: Image.Image | None = None) -> ImageCheck:
    if im is None:
        return ImageCheck(REJECT, reason, detail=detail)
    return ImageCheck(REJECT, reason, im.format, im.mode, tuple(im.size), detail)


def jpeg_sof(path: str | Path) -> tuple[int, int] | None:
    """``(marker, precision)`` of a JPEG's start-of-frame segment, ``None`` if there is none.

    Walks the marker segments from the start of the file; reads only the headers.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None
        while True:
            byte = fh.read(1)
            if not byte:
                return None
            if byte != b"\xff":
                continue  # tolerate garbage between segments, as libjpeg does
            marker = fh.read(1)
            while marker == b"\xff":  # fill bytes
                marker = fh.read(1)
            if not marker:
                return None
            m = marker[0]
            if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
                continue  # markers without a length field
            if m in (0xD9, 0xDA):
                return None  # end of image / start of scan before any frame header
            length_bytes = fh.read(2)
            if len(length_bytes) < 2:
                return None
            length = int.from_bytes(length_bytes, "big")
            if m in _SOF_MARKERS:
                precision = fh.read(1)
                return (m, precision[0]) if precision else None
            fh.seek(length - 2, os.SEEK_CUR)


def _failure(path: Path, exc: Exception, im: Image.Image | None = None) -> ImageCheck:
    """A reject for a file Pillow failed on: ``truncated`` or ``decode_error``."""
    text = str(exc)
    truncated = "truncated" in text.lower()
    if not truncated:
        # A JPEG that fails without an end-of-image marker near its end is a cut-off download,
        # which Pillow words differently depending on where the cut falls.
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(max(0, path.stat().st_size - 1024))
            truncated = head == b"\xff\xd8" and b"\xff\xd9" not in fh.read()
    reason = "truncated" if truncated else "decode_error"
    return _reject(reason, f"{path}: {type(exc).__name__}: {text}", im)


def inspect_image(
    path: str | Path, *, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS
) -> ImageCheck:
    """Decode ``path`` completely and say whether DALI can read it as is, after re-encoding, or not.

    Never raises for a bad file: every failure becomes a ``reject`` with a reason. Animated
    images are judged (and later re-encoded) by their first frame.
    """
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        return _reject("missing", f"{path}: no such file")
    except OSError as exc:
        return _reject("unreadable", f"{path}: {exc}")
    if not path.is_file():
        return _reject("unreadable", f"{path}: not a regular file")
    if nbytes == 0:
        return _reject("empty_file", f"{path}: zero bytes")

    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        return _reject("unidentified", f"{path}: not an image format Pillow recognises")
    except Image.DecompressionBombError as exc:
        return _reject("too_large", f"{path}: {exc}")
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise many types on malformed headers
        return _failure(path, exc)

    with im:
        width, height = im.size
        if min(width, height) < min_side:
            return _reject("too_small", f"{path}: {width}x{height} px, a side < {min_side}", im)
        if width * height > max_pixels:
            return _reject("too_large", f"{path}: {width}x{height} px > {max_pixels} pixels", im)
        try:
            im.load()  # full decode of the first frame: finds truncation and corrupt data
        except MemoryError:
            raise
        except Exception as exc:
            return _failure(path, exc, im)

        fmt, mode, size = im.format, im.mode, (width, height)
        if fmt not in _JPEG_FORMATS:
            frames = getattr(im, "n_frames", 1)
            detail = f"{path}: {fmt} {mode} image" + (f" ({frames} frames)" if frames > 1 else "")
            return ImageCheck(REENCODE, f"format_{str(fmt).lower()}", fmt, mode, size, detail)
        if mode != "RGB":
            return ImageCheck(
                REENCODE, f"mode_{mode.lower()}", fmt, mode, size, f"{path}: JPEG in mode {mode}"
            )

    sof = jpeg_sof(path)
    if sof is None:
        return ImageCheck(REENCODE, "jpeg_no_frame", fmt, mode, size, f"{path}: no SOF marker")
    marker, precision = sof
    if marker not in _DALI_SOF:
        kind = "lossless" if marker in (0xC3, 0xC7, 0xCB, 0xCF) else "arithmetic_or_hierarchical"
        return ImageCheck(
            REENCODE, f"jpeg_{kind}", fmt, mode, size, f"{path}: JPEG SOF marker 0xFF{marker:02X}"
        )
    if precision != 8:
        return ImageCheck(
            REENCODE, "jpeg_precision", fmt, mode, size, f"{path}: {precision}-bit JPEG"
        )
    return ImageCheck(OK, "", fmt, mode, size, f"{path}: {_DALI_SOF[marker]} RGB JPEG")


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    # Pillow's convert("L") clips 16-bit values at 255 (a white image); scale instead.
    arr = np.asarray(im, dtype=np.float64)
    if arr.size and arr.max() > 255:
        arr = arr / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    # With an embedded profile a colour-managed conversion is far closer to what the photographer
    # saw than Pillow's naive formula; fall back to the formula for broken profiles.
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """A loaded image as 8-bit RGB.

    Alpha is composited on white, palettes expanded, 16-bit and 32-bit grey scaled (not clipped)
    to 8 bits, CMYK converted through its embedded ICC profile when there is one.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _HIGH_DEPTH_MODES:
        return _scale_to_8bit(im).convert("RGB")
    if mode == "P":
        if "transparency" in im.info:
            return _composite_on_white(im.convert("RGBA"))
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite_on_white(im)
    return im.convert("RGB")


def reencode_to_jpeg(src: str | Path, dst: str | Path, quality: int = 95) -> None:
    """Write the first frame of ``src`` to ``dst`` as a baseline 8-bit RGB JPEG, atomically.

    EXIF orientation is applied to the pixels (the re-encoded file carries no EXIF), so the image
    looks the same as a decoder that honours orientation would show the original. Raises the
    decoder's exception if ``src`` cannot be decoded; ``dst`` is then left untouched.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.seek(0)
        im.load()
        rgb = to_rgb(ImageOps.exif_transpose(im))
        with atomic_path(dst) as tmp:
            rgb.save(tmp, format="JPEG", quality=int(quality), progressive=False)
