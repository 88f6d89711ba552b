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
  SOI to the first SOS (:func:`inspect_jpeg`; on base64, :func:`jpeg_b64_info` decodes only the
  header segments and the last bytes, after one C pass checking the base64 alphabet): the header
  must be intact, the frame a plain 8-bit Huffman one (baseline, extended or progressive) with 3
  components, no Adobe segment (CMYK/YCCK), no EXIF rotation, within ``max_side``/``max_pixels``,
  a scan must follow, and the file must end with EOI (a cut download does not). Anything that
  fails goes down the full path below, which then says why (truncated, corrupt, CMYK, ...). This
  costs a few microseconds per image, about what copying its base64 costs, so preparing a clean
  MUGE TSV runs at the speed of cn_clip's own builder. **The trade-off:** damage *inside* the
  entropy-coded data of a file whose structure is intact (bytes flipped or a chunk cut out
  mid-stream, the EOI still there) goes unnoticed. Such an image still reaches training, where
  :func:`solution.data.decode_image` decodes defensively: it comes out with artefacts, or is
  dropped from its batch, never a crash (cn_clip's own ``LMDBDataset`` has no such guard).
* ``"full"``: the image is decoded as well (at 1/8 scale for a kept JPEG, which still
  entropy-decodes every block), so mid-stream damage is caught too; several times slower.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field


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
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb threshold (Image.MAX_IMAGE_PIXELS); PIL is imported
# only when an image is decoded, so checking a clean TSV never loads it
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
_ORIENTATION = 0x0112
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_EXIF_TRANSPOSES = {2, 3, 4, 5, 6, 7, 8}


@dataclass
class CleanResult:
    status: str                      # "kept" | "converted" | "skipped"
    data: bytes | None = None        # the image to store (raw bytes, or base64 from clean_b64)
    format: str | None = None        # what the bytes really are (JPEG, PNG, GIF, WEBP, BMP, TIFF, ...)
    size: tuple[int, int] | None = None  # (width, height) of the stored image
    actions: list[str] = field(default_factory=list)  # conversions applied, e.g. ["first_frame", "mode_P"]
    reason: str | None = None        # one of REASONS when skipped
    detail: str = ""                 # a human-readable explanation when skipped

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
            head[:1] == b"<" and b">" in head):
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
        return binascii.a2b_base64(s.translate(_URL_TO_STD), strict_mode=True), None
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


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of an EXIF (TIFF) block, 1 when absent or unreadable."""
    try:
        order = {b"II": "little", b"MM": "big"}[bytes(tiff[:2])]
        u16 = lambda o: int.from_bytes(tiff[o:o + 2], order)  # noqa: E731
        ifd = int.from_bytes(tiff[4:8], order)
        for k in range(u16(ifd)):
            entry = ifd + 2 + 12 * k
            if u16(entry) == _ORIENTATION:
                return u16(entry + 8)
    except (KeyError, IndexError, ValueError):
        pass
    return 1


@dataclass
class JpegInfo:
    width: int
    height: int
    components: int
    orientation: int
    complete: bool          # ends with the EOI marker
    sof: int = 0xC0         # the frame marker: C0 baseline, C1 extended, C2 progressive, others rare
    precision: int = 8      # bits per sample
    adobe: bool = False     # an Adobe APP14 segment (colour transform of CMYK/YCCK/RGB files)

    def keepable(self, max_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bool:
        """True when the structure says a decoder yields an upright RGB image within the limits as is."""
        w, h = self.width, self.height
        return (self.complete and self.components == 3 and self.sof in _PLAIN_SOF and self.precision == 8
                and not self.adobe and self.orientation not in _EXIF_TRANSPOSES and w > 0 and h > 0
                and not (max_side and (w > max_side or h > max_side))
                and not (max_pixels and w * h > max_pixels))


_PLAIN_SOF = (0xC0, 0xC1, 0xC2)  # Huffman-coded baseline / extended / progressive: what every decoder reads
_EXIF_MAX = 1 << 16  # an APP1 segment is at most 64 KiB anyway


# What each marker byte after 0xFF means to the walk.
_SEGMENT, _SOF, _SOS, _APP1, _APP14, _FILL, _STANDALONE, _BAD = range(8)
_MARKER_KIND = tuple(
    _FILL if m == 0xFF else _STANDALONE if m == 0x01 or 0xD0 <= m <= 0xD7 else _BAD if m in (0xD8, 0xD9)
    else _SOS if m == 0xDA else _APP1 if m == 0xE1 else _APP14 if m == 0xEE
    else _SOF if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) else _SEGMENT
    for m in range(256))


def _walk_jpeg(buf: bytes, n: int, tail: bytes, fetch=None) -> JpegInfo | None:
    """Walk a JPEG's marker segments from SOI to the first SOS, without decoding pixels.

    ``buf`` holds the first bytes of the ``n``-byte file (all of them, or else ``fetch(a, b)``
    returns ``(bytes, offset)`` holding bytes ``[a, b)``); ``tail`` is the file's last bytes.
    None when the bytes are not a cleanly structured JPEG: no SOI, a byte where a marker belongs,
    a segment running past the end, EOI or a second SOI before the scan, none or two frame headers
    (SOF), no scan (SOS).
    """
    if buf[:3] != b"\xff\xd8\xff":
        return None
    base, have = 0, len(buf)  # buf holds bytes [base, base + have)
    i = 2
    size = None
    comps = sof = precision = 0
    orientation, adobe = 1, False
    kinds = _MARKER_KIND
    while i + 4 <= n:
        j = i - base
        if j + 16 > have and base + have < n:  # the next segment head lies outside the decoded window
            if fetch is None:
                return None
            buf, base = fetch(i, i + 512)
            have, j = len(buf), i - base
        if buf[j] != 0xFF:
            return None
        kind = kinds[buf[j + 1]]
        if kind >= _FILL:
            if kind == _BAD:  # SOI again / EOI before any scan
                return None
            i += 1 if kind == _FILL else 2  # a fill byte / a standalone marker
            continue
        end = i + 2 + ((buf[j + 2] << 8) | buf[j + 3])
        if end < i + 4 or end > n:
            return None
        if kind == _SEGMENT:  # tables, comments, other application data: skipped unread
            i = end
            continue
        if kind == _SOS:  # start of scan: the entropy-coded data follows
            if size is None:
                return None
            t = tail if tail[-2:] == b"\xff\xd9" else tail.rstrip(b"\x00\r\n ")
            return JpegInfo(size[0], size[1], comps, orientation, t.endswith(b"\xff\xd9"), sof, precision, adobe)
        if kind == _SOF:
            if size is not None or end - i < 10:
                return None
            seg = buf[j + 4:j + 10]
            precision, size, comps, sof = seg[0], ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2]), seg[5], buf[j + 1]
        elif kind == _APP1 and buf[j + 4:j + 10] == b"Exif\x00\x00":
            stop = min(end, i + 10 + _EXIF_MAX)
            if base + have >= stop:
                exif = buf[j + 10:stop - base]
            elif fetch is not None:
                seg, at = fetch(i + 10, stop)
                exif = seg[i + 10 - at:stop - at]
            else:
                return None
            orientation = _exif_orientation(exif)
        elif kind == _APP14 and buf[j + 4:j + 9] == b"Adobe":
            adobe = True
        i = end
    return None


def inspect_jpeg(data: bytes) -> JpegInfo | None:
    """Read a JPEG's markers up to the scan without decoding pixels; None if the header is not clean."""
    return _walk_jpeg(data, len(data), bytes(data[-64:]))


B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_"
_B64_JPEG_HEAD = frozenset((b"/9j/", b"_9j_"))  # base64 of FF D8 FF (standard, URL-safe)
_PADS = (b"", b"=", b"==")
_B64_PREFIX = 1024  # base64 characters decoded up front (768 bytes: the header of a typical JPEG)


def jpeg_b64_info(b64: bytes) -> JpegInfo | None:
    """:func:`inspect_jpeg` straight on base64 text, decoding only the header segments and the tail.

    None unless the text is strict base64 (standard or URL-safe alphabet, length a multiple of 4,
    ``=`` only as padding: exactly what cn_clip's reader decodes) of a cleanly structured JPEG.
    Costs a few microseconds whatever the image size: one C pass over the text to check its
    alphabet, then only the 4-character groups that hold marker segments are decoded.
    """
    left = b64.translate(None, B64_ALPHABET)  # one C pass: what is not in the alphabet
    if left not in _PADS:
        return None
    return jpeg_b64_span(b64, 0, len(b64), len(left))


def jpeg_b64_span(buf: bytes, start: int, stop: int, pad: int) -> JpegInfo | None:
    """:func:`jpeg_b64_info` of ``buf[start:stop]`` for a caller that has already checked that the span
    holds only base64 characters plus ``pad`` (0..2) ``=`` (e.g. for a whole block of TSV lines at
    once). Nothing of the span is copied but the header and the tail."""
    n4 = stop - start
    if n4 < 8 or n4 & 3 or buf[start:start + 4] not in _B64_JPEG_HEAD or buf[stop - pad:stop] != _PADS[pad]:
        return None
    try:
        def fetch(a: int, b: int) -> tuple[bytes, int]:
            q = a // 3
            raw = binascii.a2b_base64(buf[start + 4 * q:min(stop, start + 4 * -(-b // 3))].translate(_URL_TO_STD))
            return raw, 3 * q

        prefix = binascii.a2b_base64(buf[start:min(stop, start + _B64_PREFIX)].translate(_URL_TO_STD))
        tail = binascii.a2b_base64(buf[stop - 88:stop].translate(_URL_TO_STD)) if n4 > 88 else prefix
        return _walk_jpeg(prefix, n4 // 4 * 3 - pad, tail, fetch)
    except (binascii.Error, ValueError, IndexError):
        return None


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
            arr = (arr.astype(np.uint32) >> 8)
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


def clean_image(data: bytes, *, max_side: int | None = None, quality: int = DEFAULT_QUALITY,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, check: str = "structural") -> CleanResult:
    """Check and clean one image's raw bytes (see the module docstring). Never raises.

    ``check="structural"`` (default) keeps a JPEG whose marker structure says it is a plain upright
    RGB image within the limits (:meth:`JpegInfo.keepable`) without decoding pixels;
    ``check="full"`` decodes it (at 1/8 scale, which still entropy-decodes every block).
    Everything else takes the full path either way.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    from PIL import Image, ImageOps

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
        w, h = im.size
        if max_pixels and w * h > max_pixels:
            return _skip("decompression_bomb", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}", fmt)
        if w < 1 or h < 1:
            return _skip("corrupt", f"image size {w}x{h}", fmt)
        actions: list[str] = []
        if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
            actions.append("first_frame")
            im.seek(0)
        orientation = im.getexif().get(_ORIENTATION, 1) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else 1
        needs_resize = bool(max_side) and max(w, h) > max_side
        keep = fmt == "JPEG" and im.mode == "RGB" and orientation not in _EXIF_TRANSPOSES and not needs_resize
        if keep:
            # verify the whole stream cheaply: decoding at 1/8 scale still entropy-decodes every block
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            return CleanResult("kept", data=data, format=fmt, size=(w, h))
        if needs_resize and fmt == "JPEG":
            scale = max_side / max(w, h)
            im.draft(None, (max(1, int(w * scale * 2)), max(1, int(h * scale * 2))))  # fast JPEG downscale
        im.load()
        if orientation in _EXIF_TRANSPOSES:
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
    except Image.DecompressionBombError as e:
        return _skip("decompression_bomb", f"{type(e).__name__}: {e}", fmt)
    except Image.UnidentifiedImageError as e:
        return _skip("not_an_image" if fmt is None else "corrupt", f"{type(e).__name__}: {e}", fmt)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
            ZeroDivisionError, Image.DecompressionBombWarning) as e:
        if isinstance(e, ValueError) and "mode" in str(e).lower():
            return _skip("unsupported", f"{type(e).__name__}: {e}", fmt)
        reason, detail = _error_reason(e, data, fmt)
        return _skip(reason, detail, fmt)
    except MemoryError:
        return _skip("decompression_bomb", "MemoryError while decoding", fmt)
    except Exception as e:  # noqa: BLE001 - a worker must never die on one image
        return _skip("corrupt", f"{type(e).__name__}: {e}", fmt)


def clean_b64(b64: str | bytes, *, max_side: int | None = None, quality: int = DEFAULT_QUALITY,
              max_pixels: int | None = DEFAULT_MAX_PIXELS, check: str = "structural") -> CleanResult:
    """:func:`clean_image` on base64 text; ``data`` of the result is base64 (URL-safe, as cn_clip writes).

    A kept image whose base64 was already strict is passed through byte for byte (the very same
    object when given bytes). With ``check="structural"`` a plain JPEG is recognised on the base64
    text itself (:func:`jpeg_b64_info`), without decoding the image data.
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

