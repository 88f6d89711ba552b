"""Sniff, check and clean one image: bytes in, RGB JPEG (or the untouched original) out, or a reason.

Images in the wild are messy: a ``.jpg`` that is really a GIF, PNG, WebP, BMP or TIFF; animated
GIFs; palette, alpha, CMYK, 16-bit and grayscale images; EXIF-rotated photos; truncated downloads;
HTML error pages saved as ``.jpg``; decompression bombs; broken base64. :func:`clean_image` and
:func:`clean_b64` handle each of these and **never raise**: a bad input comes back as a
:class:`CleanResult` with ``status == "skipped"`` and a ``reason`` from :data:`REASONS`.

What comes out:

* a JPEG already in RGB, upright and small enough is **kept byte for byte** (``status="kept"``;
  from base64, the very same base64 text);
* anything else is decoded by what its bytes say it is, converted to RGB (the first frame of an
  animation; alpha composited onto white; CMYK, 16-bit, palette and grayscale converted; EXIF
  orientation applied; optionally shrunk so its longer side is at most ``max_side``) and re-encoded
  as JPEG at ``quality`` (``status="converted"``, ``actions`` says what was done).

How a JPEG earns "kept" depends on ``check`` (:data:`CHECKS`):

* ``"structural"`` (the default): no pixel is decoded. The file's marker segments are walked from
  SOI to the first SOS (:mod:`solution.data.jpeg`; on base64, only the header segments and the
  last bytes are decoded, after one C pass checking the base64 alphabet): the header
  must be intact, the frame a plain 8-bit Huffman one (baseline, extended or progressive) with 3
  components, no Adobe segment (CMYK/YCCK), no EXIF rotation, within ``max_side``/``max_pixels``,
  a scan must follow, and the file must end with EOI (a cut download does not). Anything that
  fails goes down the full path below, which then says why (truncated, corrupt, CMYK, ...). This
  costs a few microseconds per image, about what copying its base64 costs, so preparing a clean
  MUGE TSV runs at the speed of cn_clip's own builder. **The trade-off:** damage *inside* the
  entropy-coded data of a file whose structure is intact (bytes flipped or a chunk cut out
  mid-stream, the EOI still there) goes unnoticed. Such an image still reaches training, where
  :func:`solution.data.datasets.decode_image` decodes defensively: it comes out with artefacts, or is
  dropped from its batch, never a crash (cn_clip's own ``LMDBDataset`` has no such guard).
* ``"full"``: the image is decoded as well (at 1/8 scale for a kept JPEG, which still
  entropy-decodes every block), so mid-stream damage is caught too; several times slower.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from .jpeg import DEFAULT_MAX_PIXELS, EXIF_TRANSPOSES, ORIENTATION, URL_TO_STD, inspect_jpeg, jpeg_b64_info

# Reasons an image is skipped (the report counts and lists them by these names).
REASONS = {
    "empty": "no bytes at all",
    "invalid_base64": "the base64 text does not decode",
    "not_an_image": "the bytes are not an image (e.g. an HTML error page)",
    "truncated": "the file ends before the image does",
    "corrupt": "the image data cannot be decoded",
    "decompression_bomb": "the declared size exceeds the pixel limit",
    "unsupported": "a format or pixel mode that cannot be converted to RGB",
}

DEFAULT_QUALITY = 95
CHECKS = ("structural", "full")  # how a JPEG is checked before it is kept (module docstring); the first is the default

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


class CleanResult:
    """What :func:`clean_image` / :func:`clean_b64` say about one image."""

    __slots__ = ("actions", "data", "detail", "format", "reason", "size", "status")

    def __init__(
        self,
        status: str,
        data: bytes | None = None,
        format: str | None = None,
        size: tuple[int, int] | None = None,
        actions: list[str] | None = None,
        reason: str | None = None,
        detail: str = "",
    ):
        self.status = status  # "kept" | "converted" | "skipped"
        self.data = data  # the image to store (raw bytes, or base64 from clean_b64)
        self.format = format  # what the bytes really are (JPEG, PNG, GIF, WEBP, BMP, TIFF, ...)
        self.size = size  # (width, height) of the stored image
        self.actions = [] if actions is None else actions  # conversions applied, e.g. ["first_frame", "mode_P"]
        self.reason = reason  # one of REASONS when skipped
        self.detail = detail  # a human-readable explanation when skipped

    def __repr__(self) -> str:
        return (
            f"CleanResult(status={self.status!r}, format={self.format!r}, size={self.size!r}, "
            f"actions={self.actions!r}, reason={self.reason!r}, detail={self.detail!r})"
        )

    @property
    def ok(self) -> bool:
        return self.status != "skipped"


def _skip(reason: str, detail: str = "", fmt: str | None = None) -> CleanResult:
    return CleanResult("skipped", format=fmt, reason=reason, detail=detail or REASONS[reason])


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes announce (JPEG, PNG, GIF, WEBP, BMP, TIFF), or None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def looks_like_text(data: bytes) -> str | None:
    """'an HTML page' / 'text' / 'JSON text' when the bytes look like markup or text rather than binary, else None."""
    head = bytes(data[:512]).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        return "text"
    low = head[:64].lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or (
        head[:1] == b"<" and b">" in head
    ):
        return "an HTML page"
    if head[:1] in (b"{", b"["):
        return "JSON text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return "text" if printable >= 0.95 * len(text) else None


def decode_base64(b64: str | bytes) -> tuple[bytes, bytes | None]:
    """Decode standard or URL-safe base64, tolerating whitespace and missing padding.

    Returns ``(raw bytes, canonical base64 or None)``; the second item is None when the input is
    already in a form ``base64.urlsafe_b64decode`` (cn_clip's reader) accepts unchanged.
    Raises ``ValueError`` for text that is not base64.
    """
    s = b64.encode("ascii", "replace") if isinstance(b64, str) else b64
    try:  # the common case, in C: URL-safe or standard alphabet, correct padding, nothing else
        return binascii.a2b_base64(s.translate(URL_TO_STD), strict_mode=True), None
    except (binascii.Error, ValueError, TypeError):
        pass
    t = b"".join(s.split()).translate(bytes.maketrans(b"-_", b"+/")).rstrip(b"=")
    if len(t) % 4 == 1:
        raise ValueError("base64 text has an impossible length")
    t += b"=" * (-len(t) % 4)
    try:
        raw = base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None
    return raw, base64.urlsafe_b64encode(raw)


def _error_reason(e: BaseException, data: bytes, fmt: str | None) -> tuple[str, str]:
    from PIL import Image

    msg = f"{type(e).__name__}: {e}"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "decompression_bomb", msg
    if "truncated" in str(e).lower() or isinstance(e, EOFError):
        return "truncated", msg
    if fmt == "JPEG" and not bytes(data[-2:]) == b"\xff\xd9" and not bytes(data).rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated", f"{msg} (no JPEG end marker)"
    if fmt == "PNG" and b"IEND" not in bytes(data[-32:]):
        return "truncated", f"{msg} (no PNG end chunk)"
    return "corrupt", msg


def _to_rgb(im, actions: list[str]):
    """Any PIL mode -> RGB; alpha is composited onto white (as a shop page shows a transparent PNG)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    actions.append(f"mode_{mode}")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
        mode = "RGBA"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint32) >> 8
        elif arr.size and float(arr.max()) > 255:
            arr = arr.astype(np.float64) * (255.0 / float(arr.max()))
        elif mode == "F" and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, ...


def clean_image(
    data: bytes,
    *,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    check: str = "structural",
) -> CleanResult:
    """Check and clean one image's raw bytes (see the module docstring). Never raises.

    ``check="structural"`` (default) keeps a JPEG whose marker structure says it is a plain upright
    RGB image within the limits (:meth:`solution.data.jpeg.JpegInfo.keepable`) without decoding pixels;
    ``check="full"`` decodes it (at 1/8 scale, which still entropy-decodes every block).
    Everything else takes the full path either way.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    from PIL import Image

    fmt = None
    try:
        if not data:
            return _skip("empty")
        fmt = sniff_format(data)
        if check == "structural" and fmt == "JPEG":
            info = inspect_jpeg(data)
            if info is not None and info.keepable(max_side, max_pixels):
                return CleanResult("kept", data=data, format=fmt, size=(info.width, info.height))
        if fmt is None:
            kind = looks_like_text(data)
            if kind:
                return _skip("not_an_image", f"the bytes are {kind}, not an image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt] if fmt else None)
        fmt = im.format or fmt
        return _clean_opened(im, data, fmt, max_side, quality, max_pixels)
    except Exception as e:  # noqa: BLE001 - a worker must never die on one image
        return _failed(e, data, fmt)


def _clean_opened(im, data: bytes, fmt: str, max_side: int | None, quality: int, max_pixels: int | None) -> CleanResult:
    """The full path of :func:`clean_image` on an opened PIL image: kept as is, or converted."""
    from PIL import Image, ImageOps

    w, h = im.size
    if max_pixels and w * h > max_pixels:
        return _skip("decompression_bomb", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}", fmt)
    if w < 1 or h < 1:
        return _skip("corrupt", f"image size {w}x{h}", fmt)
    actions: list[str] = []
    if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
        actions.append("first_frame")
        im.seek(0)
    orientation = im.getexif().get(ORIENTATION, 1) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else 1
    needs_resize = bool(max_side) and max(w, h) > max_side
    keep = fmt == "JPEG" and im.mode == "RGB" and orientation not in EXIF_TRANSPOSES and not needs_resize
    if keep:
        # verify the whole stream cheaply: decoding at 1/8 scale still entropy-decodes every block
        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
        return CleanResult("kept", data=data, format=fmt, size=(w, h))
    if needs_resize and fmt == "JPEG":
        scale = max_side / max(w, h)
        im.draft(None, (max(1, int(w * scale * 2)), max(1, int(h * scale * 2))))  # fast JPEG downscale
    im.load()
    if orientation in EXIF_TRANSPOSES:
        im = ImageOps.exif_transpose(im)
        actions.append("exif_orientation")
    im = _to_rgb(im, actions)
    if needs_resize:
        scale = max_side / max(im.size)
        new = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC, reducing_gap=2.0)
        actions.append("resized")
    if fmt != "JPEG":
        actions.append(f"from_{fmt}")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    return CleanResult("converted", data=buf.getvalue(), format=fmt, size=im.size, actions=actions)


def _failed(e: Exception, data: bytes, fmt: str | None) -> CleanResult:
    """The skip an exception raised while cleaning an image stands for."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        return _skip("decompression_bomb", f"{type(e).__name__}: {e}", fmt)
    if isinstance(e, Image.UnidentifiedImageError):
        return _skip("not_an_image" if fmt is None else "corrupt", f"{type(e).__name__}: {e}", fmt)
    if isinstance(
        e,
        (
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            IndexError,
            KeyError,
            TypeError,
            ZeroDivisionError,
            Image.DecompressionBombWarning,
        ),
    ):
        if isinstance(e, ValueError) and "mode" in str(e).lower():
            return _skip("unsupported", f"{type(e).__name__}: {e}", fmt)
        reason, detail = _error_reason(e, data, fmt)
        return _skip(reason, detail, fmt)
    if isinstance(e, MemoryError):
        return _skip("decompression_bomb", "MemoryError while decoding", fmt)
    return _skip("corrupt", f"{type(e).__name__}: {e}", fmt)


def clean_b64(
    b64: str | bytes,
    *,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    check: str = "structural",
) -> CleanResult:
    """:func:`clean_image` on base64 text; ``data`` of the result is base64 (URL-safe, as cn_clip writes).

    A kept image whose base64 was already strict is passed through byte for byte (the very same
    object when given bytes). With ``check="structural"`` a plain JPEG is recognised on the base64
    text itself (:func:`solution.data.jpeg.jpeg_b64_info`), without decoding the image data.
    """
    if check == "structural" and b64 and isinstance(b64, (bytes, str)):
        raw_b64 = b64 if isinstance(b64, bytes) else b64.encode("ascii", "replace")
        info = jpeg_b64_info(raw_b64)
        if info is not None and info.keepable(max_side, max_pixels):
            return CleanResult("kept", data=raw_b64, format="JPEG", size=(info.width, info.height))
    if b64 is None or not (b64.strip() if isinstance(b64, (str, bytes)) else True):
        return _skip("empty", "empty base64 field")
    try:
        raw, canonical = decode_base64(b64)
    except ValueError as e:
        return _skip("invalid_base64", str(e))
    except Exception as e:  # noqa: BLE001
        return _skip("invalid_base64", f"{type(e).__name__}: {e}")
    res = clean_image(raw, max_side=max_side, quality=quality, max_pixels=max_pixels, check=check)
    if res.status == "kept":
        res.data = canonical if canonical is not None else (b64.encode("ascii") if isinstance(b64, str) else b64)
    elif res.status == "converted":
        res.data = base64.urlsafe_b64encode(res.data)
    return res
