"""The structural JPEG check: a JPEG's marker segments walked without decoding a pixel.

:func:`inspect_jpeg` walks the raw bytes; :func:`jpeg_b64_info` and :func:`jpeg_b64_span` walk
base64 text, decoding only the 4-character groups that hold marker segments and the file's last
bytes. Either says what the frame header declares (:class:`JpegInfo`: size, components, frame
type, precision, EXIF orientation, an Adobe segment, whether the file ends with EOI), or None
when the structure is not clean; :meth:`JpegInfo.keepable` says whether a decoder yields an
upright RGB image within the limits as is. The trade-off of checking no more than this is in
:mod:`solution.data.images`.
"""

from __future__ import annotations

import binascii

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own bomb threshold (Image.MAX_IMAGE_PIXELS); PIL is imported
# only when an image is decoded, so checking a clean TSV never loads it
ORIENTATION = 0x0112  # the EXIF orientation tag
EXIF_TRANSPOSES = {2, 3, 4, 5, 6, 7, 8}  # orientations that turn or mirror the image
URL_TO_STD = bytes.maketrans(b"-_", b"+/")  # URL-safe base64 -> the standard alphabet


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of an EXIF (TIFF) block, 1 when absent or unreadable."""
    try:
        order = {b"II": "little", b"MM": "big"}[bytes(tiff[:2])]

        def u16(o):
            return int.from_bytes(tiff[o : o + 2], order)

        ifd = int.from_bytes(tiff[4:8], order)
        for k in range(u16(ifd)):
            entry = ifd + 2 + 12 * k
            if u16(entry) == ORIENTATION:
                return u16(entry + 8)
    except (KeyError, IndexError, ValueError):
        pass
    return 1


class JpegInfo:
    """What a JPEG's frame header and marker segments declare (a slotted class: one is made per image)."""

    __slots__ = ("adobe", "complete", "components", "height", "orientation", "precision", "sof", "width")

    def __init__(
        self,
        width: int,
        height: int,
        components: int,
        orientation: int,
        complete: bool,
        sof: int = 0xC0,
        precision: int = 8,
        adobe: bool = False,
    ):
        self.width, self.height, self.components, self.orientation = width, height, components, orientation
        self.complete = complete  # ends with the EOI marker
        self.sof = sof  # the frame marker: C0 baseline, C1 extended, C2 progressive, others rare
        self.precision = precision  # bits per sample
        self.adobe = adobe  # an Adobe APP14 segment (colour transform of CMYK/YCCK/RGB files)

    def _fields(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other):
        return type(other) is JpegInfo and self._fields() == other._fields()

    __hash__ = None

    def __repr__(self) -> str:
        return "JpegInfo(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def keepable(self, max_side: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bool:
        """True when the structure says a decoder yields an upright RGB image within the limits as is."""
        w, h = self.width, self.height
        return (
            self.complete
            and self.components == 3
            and self.sof in _PLAIN_SOF
            and self.precision == 8
            and not self.adobe
            and self.orientation not in EXIF_TRANSPOSES
            and w > 0
            and h > 0
            and not (max_side and (w > max_side or h > max_side))
            and not (max_pixels and w * h > max_pixels)
        )


_PLAIN_SOF = (0xC0, 0xC1, 0xC2)  # Huffman-coded baseline / extended / progressive: what every decoder reads
_EXIF_MAX = 1 << 16  # an APP1 segment is at most 64 KiB anyway


# What each marker byte after 0xFF means to the walk.
_SEGMENT, _SOF, _SOS, _APP1, _APP14, _FILL, _STANDALONE, _BAD = range(8)
_MARKER_KIND = tuple(
    _FILL
    if m == 0xFF
    else _STANDALONE
    if m == 0x01 or 0xD0 <= m <= 0xD7
    else _BAD
    if m in (0xD8, 0xD9)
    else _SOS
    if m == 0xDA
    else _APP1
    if m == 0xE1
    else _APP14
    if m == 0xEE
    else _SOF
    if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC)
    else _SEGMENT
    for m in range(256)
)


def _segment(buf: bytes, have_to: int, shift: int, start: int, stop: int, fetch) -> bytes | None:
    """Bytes ``[start, stop)`` of the file: from ``buf`` (file offset ``o`` at ``buf[o + shift]``,
    holding the file up to ``have_to``), else fetched; None when neither can."""
    if have_to >= stop:
        return buf[start + shift : stop + shift]
    if fetch is None:
        return None
    seg, at = fetch(start, stop)
    return seg[start - at : stop - at]


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
            seg = buf[j + 4 : j + 10]
            precision, size, comps, sof = seg[0], ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2]), seg[5], buf[j + 1]
        elif kind == _APP1 and buf[j + 4 : j + 10] == b"Exif\x00\x00":
            exif = _segment(buf, base + have, j - i, i + 10, min(end, i + 10 + _EXIF_MAX), fetch)
            if exif is None:
                return None
            orientation = _exif_orientation(exif)
        elif kind == _APP14 and buf[j + 4 : j + 9] == b"Adobe":
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
    if n4 < 8 or n4 & 3 or buf[start : start + 4] not in _B64_JPEG_HEAD or buf[stop - pad : stop] != _PADS[pad]:
        return None
    try:

        def fetch(a: int, b: int) -> tuple[bytes, int]:
            q = a // 3
            raw = binascii.a2b_base64(buf[start + 4 * q : min(stop, start + 4 * -(-b // 3))].translate(URL_TO_STD))
            return raw, 3 * q

        prefix = binascii.a2b_base64(buf[start : min(stop, start + _B64_PREFIX)].translate(URL_TO_STD))
        tail = binascii.a2b_base64(buf[stop - 88 : stop].translate(URL_TO_STD)) if n4 > 88 else prefix
        return _walk_jpeg(prefix, n4 // 4 * 3 - pad, tail, fetch)
    except (binascii.Error, ValueError, IndexError):
        return None
