import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from solution.data.images import CHECKS, clean_b64, clean_image, plain_jpeg


def _picture(w=48, h=32, mode="RGB"):
    """Left half red, right half blue: orientation and colour survive or not, visibly."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    return Image.fromarray(arr).convert(mode)


def _save(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation, description_len=0):
    exif = Image.Exif()
    exif[0x0112] = orientation
    if description_len:
        exif[0x010E] = "x" * description_len  # a long APP1 segment before the frame header
    return exif.tobytes()


def _animated():
    first = _picture().convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("RGB", (48, 32), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    return _save(first, "GIF", save_all=True, append_images=[second], duration=50)


def _transparent_corner():
    rgba = _picture().convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 10, 10))  # a transparent corner whose hidden colour is red
    rgba.putalpha(alpha)
    return _save(rgba, "PNG")


def _png_claiming(w, h):
    """A tiny PNG whose header declares w x h pixels (a decompression bomb's header)."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


JPEG = _save(_picture(64, 64), "JPEG")
PNG = _save(_picture(), "PNG")
SOS = JPEG.index(b"\xff\xda")

# name -> (bytes, status, reason when skipped / an action when converted, (x, y) red and (x, y) white pixels)
CASES = {
    **{
        f"{fmt} named .jpg": (_save(_picture(), fmt), "converted", f"from_{fmt}", (5, 16), None)
        for fmt in ("PNG", "GIF", "WEBP", "BMP", "TIFF")
    },
    "animated GIF: first frame": (_animated(), "converted", "first_frame", (5, 5), None),
    "alpha onto white": (_transparent_corner(), "converted", "mode_RGBA", (20, 20), (2, 2)),
    "palette PNG": (_save(_picture(mode="P"), "PNG"), "converted", "mode_P", (5, 16), None),
    "grayscale PNG": (_save(_picture(mode="L"), "PNG"), "converted", "mode_L", None, None),
    "grayscale JPEG": (_save(_picture(mode="L"), "JPEG"), "converted", "mode_L", None, None),
    "LA PNG": (_save(_picture(mode="LA"), "PNG"), "converted", "mode_LA", None, None),
    "1-bit BMP": (_save(_picture(mode="1"), "BMP"), "converted", "mode_1", None, None),
    "CMYK JPEG (Adobe)": (_save(_picture(mode="CMYK"), "JPEG", quality=95), "converted", "mode_CMYK", (5, 16), None),
    "CMYK TIFF": (_save(_picture(mode="CMYK"), "TIFF"), "converted", "mode_CMYK", (5, 16), None),
    "EXIF rotated JPEG": (_save(_picture(), "JPEG", exif=_exif(6)), "converted", "exif_orientation", (16, 5), None),
    "empty": (b"", "skipped", "empty", None, None),
    "JPEG cut in the scan": (JPEG[: (SOS + len(JPEG)) // 2], "skipped", "truncated", None, None),
    "JPEG end marker before any scan": (JPEG[:SOS] + b"\xff\xd9", "skipped", "corrupt", None, None),
    "PNG cut": (PNG[: len(PNG) - 30], "skipped", "truncated", None, None),
    "HTML error page": (
        b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        "skipped",
        "not_an_image",
        None,
        None,
    ),
    "words": (b"just some words, not a picture", "skipped", "not_an_image", None, None),
    "random bytes": (bytes(range(256)) * 4, "skipped", "not_an_image", None, None),
    "decompression bomb": (_png_claiming(100_000, 100_000), "skipped", "decompression_bomb", None, None),
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", CASES)
def test_each_odd_image_is_converted_to_rgb_jpeg_or_skipped_with_its_reason(name, check):
    data, status, why, red, white = CASES[name]
    b64 = base64.urlsafe_b64encode(data)
    for res, raw in ((clean_image(data, check=check), bytes), (clean_b64(b64, check=check), base64.urlsafe_b64decode)):
        assert res.status == status, (name, res)
        if status == "skipped":
            assert res.reason == why and res.detail and res.data is None, (name, res)
            continue
        assert why in res.actions, (name, res)
        im = Image.open(io.BytesIO(raw(res.data)))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == res.size
        if red:
            r, g, b = im.getpixel(red)
            assert r > 150 and g < 100 and b < 100, (name, im.getpixel(red))  # red: colour and orientation kept
        if white:
            assert min(im.getpixel(white)) > 240, name  # transparent: white, not the red under it


def test_16_bit_grayscale_is_scaled_not_clipped():
    res = clean_image(_save(Image.fromarray(np.full((16, 16), 32768, np.uint16)), "PNG"))
    px = Image.open(io.BytesIO(res.data)).getpixel((8, 8))
    assert res.status == "converted" and 110 < px[0] < 145 and px[0] == px[1] == px[2]


@pytest.mark.parametrize(
    "kw",
    [{"quality": 90}, {"progressive": True}, {"icc_profile": bytes(range(256)) * 20}, {"exif": _exif(1, 3000)}],
    ids=["baseline", "progressive", "long ICC header", "EXIF upright"],
)
def test_a_clean_rgb_jpeg_is_kept_byte_for_byte(kw):
    data = _save(_picture(64, 48), "JPEG", **kw)
    assert plain_jpeg(data, data, None, None) == (64, 48)
    for check in CHECKS:
        assert clean_image(data, check=check)[:4] == ("kept", data, "JPEG", (64, 48))
        for b64 in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
            assert clean_b64(b64, check=check).data == b64  # the very base64 given: cn_clip reads either alphabet


def test_size_limits_shrink_or_skip():
    big = _save(_picture(400, 200), "JPEG", quality=95)
    assert plain_jpeg(big, big, 100, None) is None and plain_jpeg(big, big, None, 1000) is None
    res = clean_image(big, max_side=100, quality=60)
    assert res.status == "converted" and "resized" in res.actions and res.size == (100, 50)
    assert Image.open(io.BytesIO(res.data)).size == (100, 50)
    lo, hi = (clean_image(_save(_picture(400, 200), "PNG"), max_side=100, quality=q).data for q in (20, 95))
    assert len(lo) < len(hi)
    assert clean_image(big, max_side=1000).status == "kept"
    assert clean_image(big, max_pixels=1000).reason == "decompression_bomb"
    with pytest.raises(ValueError):
        clean_image(big, check="fast")  # a typo is not silently a slower or weaker check


def test_base64_variants():
    url = base64.urlsafe_b64encode(JPEG)
    assert clean_b64(base64.b64encode(JPEG).rstrip(b"=") + b"\n")[:2] == ("kept", url)  # stored canonical
    wrapped = b"\n".join(url[i : i + 76] for i in range(0, len(url), 76))  # MIME line breaks
    assert clean_b64(wrapped)[:2] == ("kept", url)
    assert clean_b64(url[:100] + b"*" + url[101:]).reason == "invalid_base64"
    assert clean_b64(url[:100] + b"=" + url[101:]).reason == "invalid_base64"  # padding in the middle
    assert clean_b64(" ").reason == "empty"
    assert clean_b64(base64.b64encode(b"<html>oops</html>")).reason == "not_an_image"
