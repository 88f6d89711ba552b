"""One image, bytes or base64 in: kept byte for byte (a JPEG a decoder yields upright, RGB and within the limits),
converted to an RGB JPEG (decoded by what its bytes are: first frame, alpha onto white, EXIF orientation applied,
optionally shrunk) or skipped with one of :data:`REASONS`. Nothing here raises on a bad image."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import NamedTuple

from PIL import Image, ImageOps

REASONS = {
    "empty": "no bytes at all",
    "invalid_base64": "the base64 text does not decode",
    "not_an_image": "the bytes are not an image (e.g. an HTML error page)",
    "truncated": "the file ends before the image does",
    "corrupt": "the image data cannot be decoded",
    "decompression_bomb": "the declared size exceeds the pixel limit",
    "unsupported": "a format or pixel mode that cannot be converted to RGB",
    "missing_file": "the image file does not exist or cannot be read",
    "malformed_line": "the line is not image_id<TAB>base64",
    "bad_id": "the image id is not an integer",
    "duplicate_id": "an image with this id was already stored (the first one wins)",
}
DEFAULT_QUALITY = 95
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold
CHECKS = ("structural", "full")  # how a JPEG is checked before it is kept; the first is the default
ORIENTATION, TURNS = 0x0112, range(2, 9)  # the EXIF orientation tag, and its values that turn or mirror the image
URL_TO_STD = bytes.maketrans(b"-_", b"+/")
B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"II*\0": "TIFF", b"MM\0*": "TIFF", b"BM": "BMP"}


class Cleaned(NamedTuple):
    status: str  # "kept" | "converted" | "skipped"
    data: bytes | None = None  # the image to store (raw, or base64 from clean_b64)
    format: str | None = None  # what the bytes really are
    size: tuple[int, int] | None = None
    actions: tuple[str, ...] = ()  # conversions applied, e.g. ("first_frame", "mode_P")
    reason: str | None = None  # one of REASONS when skipped
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "skipped"


def skip(reason: str, detail: str = "", fmt: str | None = None) -> Cleaned:
    return Cleaned("skipped", format=fmt, reason=reason, detail=detail or REASONS[reason])


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes announce (JPEG, PNG, GIF, WEBP, BMP, TIFF), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)


def plain_jpeg(data: bytes, tail: bytes, max_side: int | None, max_pixels: int | None) -> tuple[int, int] | None:
    """The size of a JPEG whose markers say a decoder yields it upright, RGB and within the limits as it
    is (an 8-bit Huffman frame of 3 components, no Adobe/EXIF-rotation segment, a scan, ``tail`` ending
    with the end marker); None otherwise. ``data``: the file, or its first bytes (a segment past them: None)."""
    n, i, size = len(data), 2, None
    if data[:3] != b"\xff\xd8\xff" or not tail[-64:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF or m == 0x01 or 0xD0 <= m <= 0xD7:  # fill byte, standalone markers
            i += 1 if m == 0xFF else 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if m in (0xD8, 0xD9) or end < i + 4 or end > n:  # SOI/EOI before the scan, a segment past the end
            return None
        if m == 0xDA:  # the scan
            break
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # a frame header
            if size is not None or m > 0xC2 or end - i < 10 or data[i + 4] != 8 or data[i + 9] != 3:
                return None
            size = (int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big"))
        elif m == 0xEE and data[i + 4 : i + 9] == b"Adobe":
            return None
        elif m == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            exif = Image.Exif()
            try:
                exif.load(data[i + 4 : end])
            except Exception:  # noqa: BLE001 - an unreadable EXIF block: PIL decides on the full path
                return None
            if exif.get(ORIENTATION, 1) in TURNS:
                return None
        i = end
    if size is None or i + 4 > n or min(size) < 1:
        return None
    w, h = size
    return None if (max_side and max(w, h) > max_side) or (max_pixels and w * h > max_pixels) else size


def _to_rgb(im: Image.Image, actions: list[str]) -> Image.Image:
    """Any mode -> RGB; alpha is composited onto white, 16-bit and float values scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    actions.append(f"mode_{mode}")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(255.0, float(arr.max(initial=0)))
        arr = arr * (255.0 / top) if mode != "F" or arr.max(initial=0) > 1 else arr * 255.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def clean_image(
    data: bytes,
    *,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    check: str = CHECKS[0],
) -> Cleaned:
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not data:
        return skip("empty")
    fmt = sniff_format(data)
    if fmt == "JPEG" and check == "structural":
        size = plain_jpeg(data, data, max_side, max_pixels)
        if size:
            return Cleaned("kept", data, fmt, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt] if fmt else None)
        return _clean_opened(im, data, im.format or fmt, max_side, quality, max_pixels)
    except Exception as e:  # noqa: BLE001 - one image never stops the run
        return _failed(e, data, fmt)


def _clean_opened(im, data: bytes, fmt: str, max_side, quality: int, max_pixels) -> Cleaned:
    w, h = im.size
    if max_pixels and w * h > max_pixels:
        return skip("decompression_bomb", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}", fmt)
    actions: list[str] = []
    if getattr(im, "n_frames", 1) > 1:
        actions.append("first_frame")
        im.seek(0)
    orientation = im.getexif().get(ORIENTATION, 1) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else 1
    shrink = bool(max_side) and max(w, h) > max_side
    if fmt == "JPEG" and im.mode == "RGB" and orientation not in TURNS and not shrink:
        im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # 1/8 scale still entropy-decodes every block
        im.load()
        return Cleaned("kept", data, fmt, (w, h))
    if shrink and fmt == "JPEG":
        im.draft(None, (max(1, int(w * max_side / max(w, h) * 2)), max(1, int(h * max_side / max(w, h) * 2))))
    im.load()
    if orientation in TURNS:
        im = ImageOps.exif_transpose(im)
        actions.append("exif_orientation")
    im = _to_rgb(im, actions)
    if shrink:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)
        actions.append("resized")
    if fmt != "JPEG":
        actions.append(f"from_{fmt}")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    return Cleaned("converted", buf.getvalue(), fmt, im.size, tuple(actions))


def _failed(e: Exception, data: bytes, fmt: str | None) -> Cleaned:
    """The skip an exception raised while cleaning an image stands for."""
    msg, tail = f"{type(e).__name__}: {e}", bytes(data[-32:])
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)):
        return skip("decompression_bomb", msg, fmt)
    if isinstance(e, Image.UnidentifiedImageError):
        return skip("corrupt", msg, fmt) if fmt else skip("not_an_image")
    if isinstance(e, ValueError) and "mode" in str(e).lower():
        return skip("unsupported", msg, fmt)
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return skip("truncated", msg, fmt)
    if (fmt == "JPEG" and not tail.rstrip(b"\0").endswith(b"\xff\xd9")) or (fmt == "PNG" and b"IEND" not in tail):
        return skip("truncated", f"{msg} (no end marker)", fmt)
    return skip("corrupt", msg, fmt)


def clean_b64(b64: bytes | str, **opts) -> Cleaned:
    """:func:`clean_image` (``opts``: its keywords) on base64 of either alphabet (loose whitespace and padding too);
    ``data`` is base64: the input itself when strict and kept (cn_clip reads it), else URL-safe."""
    b64 = b64.encode("ascii", "replace") if isinstance(b64, str) else bytes(b64)
    if opts.get("check", CHECKS[0]) == "structural" and b64[:4] in (b"/9j/", b"_9j_") and not len(b64) % 4:
        left = b64.translate(None, B64_ALPHABET)  # strict base64: the alphabet, then the padding
        if left in (b"", b"=", b"==") and b64.endswith(left):  # decoded: the first 768 bytes and the last 66
            head, tail = (binascii.a2b_base64(part.translate(URL_TO_STD)) for part in (b64[:1024], b64[-88:]))
            size = plain_jpeg(head, tail, opts.get("max_side"), opts.get("max_pixels", DEFAULT_MAX_PIXELS))
            if size:
                return Cleaned("kept", b64, "JPEG", size)
    if not b64.strip():
        return skip("empty", "empty base64 field")
    try:
        raw, stored = binascii.a2b_base64(b64.translate(URL_TO_STD), strict_mode=True), b64
    except (binascii.Error, ValueError):
        t = b"".join(b64.split()).translate(URL_TO_STD).rstrip(b"=")
        try:
            raw = base64.b64decode(t + b"=" * (-len(t) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            return skip("invalid_base64", f"not base64: {e}")
        stored = base64.urlsafe_b64encode(raw)
    res = clean_image(raw, **opts)
    if res.status == "converted":
        return res._replace(data=base64.urlsafe_b64encode(res.data))
    return res._replace(data=stored) if res.ok else res
