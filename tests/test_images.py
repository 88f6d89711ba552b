import base64
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from solution.data.images import CHECKS, clean_b64, clean_image, decode_base64, sniff_format
from solution.data.jpeg import inspect_jpeg, jpeg_b64_info


def _picture(w=48, h=32):
    """Left half red, right half blue: orientation and colour survive or not, visibly."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (220, 30, 30)
    arr[:, w // 2 :] = (30, 30, 220)
    return Image.fromarray(arr)


def _save(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decoded(res):
    assert res.ok, (res.reason, res.detail)
    im = Image.open(io.BytesIO(res.data))
    assert im.format == "JPEG" or res.status == "kept"
    return im.convert("RGB") if res.status == "kept" else im


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_a_jpg_that_is_really_something_else_is_decoded_by_its_bytes(fmt):
    data = _save(_picture(), fmt)
    assert sniff_format(data) == fmt
    res = clean_image(data)  # nothing tells it the extension; bytes decide
    assert res.status == "converted" and res.format == fmt and f"from_{fmt}" in res.actions
    im = _decoded(res)
    assert im.mode == "RGB" and im.size == (48, 32)
    r, g, b = im.getpixel((5, 16))
    assert r > 150 and b < 100


def test_clean_rgb_jpeg_is_kept_byte_for_byte():
    data = _save(_picture(), "JPEG", quality=90)
    for check in CHECKS:
        res = clean_image(data, check=check)
        assert res.status == "kept" and res.data == data and res.size == (48, 32)


def test_animated_gif_keeps_its_first_frame():
    first = _picture().convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("RGB", (48, 32), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    data = _save(first, "GIF", save_all=True, append_images=[second], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    res = clean_image(data)
    assert "first_frame" in res.actions
    r, g, b = _decoded(res).getpixel((5, 5))
    assert r > 150 and g < 100  # red from frame 0, not the green second frame


def test_alpha_is_composited_onto_white():
    rgba = _picture().convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 10, 10))  # a transparent corner whose hidden colour is red
    rgba.putalpha(alpha)
    res = clean_image(_save(rgba, "PNG"))
    assert "mode_RGBA" in res.actions
    im = _decoded(res)
    assert min(im.getpixel((2, 2))) > 240  # white, not the red under the transparency
    assert im.getpixel((20, 20))[0] > 150


@pytest.mark.parametrize(
    "mode,fmt",
    [("P", "PNG"), ("L", "PNG"), ("L", "JPEG"), ("LA", "PNG"), ("1", "BMP"), ("CMYK", "JPEG"), ("CMYK", "TIFF")],
)
def test_modes_become_rgb(mode, fmt):
    res = clean_image(_save(_picture().convert(mode), fmt))
    assert res.status == "converted" and f"mode_{mode}" in res.actions
    assert _decoded(res).mode == "RGB"


def test_cmyk_colours_survive():
    im = _decoded(clean_image(_save(_picture().convert("CMYK"), "JPEG", quality=95)))
    r, g, b = im.getpixel((5, 16))
    assert r > 150 and b < 100


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((16, 16), 32768, np.uint16)  # mid grey in 16 bits
    im16 = Image.fromarray(arr)
    assert im16.mode.startswith("I")
    res = clean_image(_save(im16, "PNG"))
    px = _decoded(res).getpixel((8, 8))
    assert res.status == "converted" and 110 < px[0] < 145 and px[0] == px[1] == px[2]


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _save(_picture(48, 32), "JPEG", exif=exif.tobytes())
    assert inspect_jpeg(data).orientation == 6
    for check in CHECKS:
        res = clean_image(data, check=check)
        assert "exif_orientation" in res.actions
        im = _decoded(res)
        assert im.size == (32, 48)
        assert im.getpixel((16, 5))[0] > 150 and im.getpixel((16, 42))[2] > 150  # red on top after rotation


def test_resize_to_max_side_and_quality():
    big = _picture(400, 200)
    data = _save(big, "JPEG", quality=95)
    res = clean_image(data, max_side=100, quality=60)
    assert res.status == "converted" and "resized" in res.actions and res.size == (100, 50)
    assert _decoded(res).size == (100, 50)
    lo = clean_image(_save(big, "PNG"), max_side=100, quality=20).data
    hi = clean_image(_save(big, "PNG"), max_side=100, quality=95).data
    assert len(lo) < len(hi)
    assert clean_image(data, max_side=1000).status == "kept"  # small enough: untouched


def _png_claiming(w, h):
    """A tiny PNG whose header declares w x h pixels (a decompression bomb's header)."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_failures_are_classified_never_raised():
    jpeg = _save(_picture(64, 64), "JPEG")
    cases = {
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not_an_image": b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        "decompression_bomb": _png_claiming(100_000, 100_000),
    }
    for reason, data in cases.items():
        res = clean_image(data)
        assert res.status == "skipped" and res.reason == reason, (reason, res)
        assert res.detail
    assert clean_image(b"just some words, not a picture").reason == "not_an_image"
    assert clean_image(bytes(range(256)) * 4).reason == "not_an_image"
    png = _save(_picture(), "PNG")
    assert clean_image(png[:40] + b"\x00" * 40 + png[80:]).reason in ("corrupt", "truncated")
    assert clean_image(png[: len(png) - 30]).reason == "truncated"
    assert clean_image(jpeg, max_pixels=1000).reason == "decompression_bomb"
    assert clean_image(jpeg[: len(jpeg) // 2], check="structural").reason == "truncated"  # no EOI: caught unread
    with pytest.raises(ValueError):
        clean_image(jpeg, check="fast")  # a typo is not silently a slower or weaker check


def test_base64_variants():
    data = _save(_picture(), "JPEG")
    std, url = base64.b64encode(data), base64.urlsafe_b64encode(data)
    assert decode_base64(url) == (data, None)
    raw, canon = decode_base64(std.rstrip(b"=") + b"\n")
    assert raw == data and canon == url
    res = clean_b64(url.decode())
    assert res.status == "kept" and res.data == url
    assert base64.urlsafe_b64decode(clean_b64(std.rstrip(b"=")).data) == data
    assert clean_b64("this is *not* base64!").reason == "invalid_base64"
    assert clean_b64("").reason == "empty"
    assert clean_b64(base64.b64encode(b"<html>oops</html>")).reason == "not_an_image"
    converted = clean_b64(base64.b64encode(_save(_picture(), "PNG")))
    assert converted.status == "converted"
    assert Image.open(io.BytesIO(base64.urlsafe_b64decode(converted.data))).format == "JPEG"


def _exif(orientation, description_len=0):
    exif = Image.Exif()
    exif[0x0112] = orientation
    if description_len:
        exif[0x010E] = "x" * description_len  # makes the APP1 segment run far past the decoded prefix
    return exif.tobytes()


def test_structural_check_reads_the_header_on_the_base64_itself():
    pic = _picture(64, 48)
    kinds = {
        "baseline": _save(pic, "JPEG", quality=90),
        "progressive": _save(pic, "JPEG", progressive=True),
        "long_icc_header": _save(pic, "JPEG", icc_profile=bytes(range(256)) * 20),  # SOF 5 kB in
        "exif_upright": _save(pic, "JPEG", exif=_exif(1, 3000)),
    }
    for name, data in kinds.items():
        info = inspect_jpeg(data)
        assert info is not None and info.keepable() and (info.width, info.height) == (64, 48), name
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            b64 = enc(data)
            assert jpeg_b64_info(b64) == info, name
            res = clean_b64(b64)
            assert res.status == "kept" and res.data is b64 and res.size == (64, 48), name  # passed through
    assert inspect_jpeg(kinds["progressive"]).sof == 0xC2
    assert not inspect_jpeg(kinds["baseline"]).keepable(max_side=32)
    assert not inspect_jpeg(kinds["baseline"]).keepable(max_pixels=1000)
    rotated = _save(pic, "JPEG", exif=_exif(6, 3000))  # orientation read from a segment beyond the prefix
    assert jpeg_b64_info(base64.b64encode(rotated)).orientation == 6


def test_structural_check_sends_each_messy_jpeg_down_the_right_path():
    good = _save(_picture(64, 64), "JPEG")
    sos = good.index(b"\xff\xda")
    cases = {  # bytes -> (what the header walk says, status, reason or action of the full path)
        "tail_cut": (good[: (sos + len(good)) // 2], "incomplete", "skipped", "truncated"),  # cut inside the scan
        "eoi_without_scan": (good[:sos] + b"\xff\xd9", None, "skipped", "corrupt"),
        "cmyk": (_save(_picture().convert("CMYK"), "JPEG"), "adobe", "converted", "mode_CMYK"),
        "grayscale": (_save(_picture().convert("L"), "JPEG"), "1 component", "converted", "mode_L"),
        "exif_rotated": (_save(_picture(), "JPEG", exif=_exif(6)), "orientation 6", "converted", "exif_orientation"),
    }
    for name, (data, header, status, why) in cases.items():
        info = inspect_jpeg(data)
        if header is None:
            assert info is None, name
        else:
            assert info is not None and not info.keepable(), name
            assert {
                "incomplete": not info.complete,
                "adobe": info.adobe and info.components == 4,
                "1 component": info.components == 1,
                "orientation 6": info.orientation == 6,
            }[header], name
        b64 = base64.urlsafe_b64encode(data)
        assert (jpeg_b64_info(b64) is None) == (info is None), name
        for res in (clean_image(data), clean_b64(b64)):
            assert res.status == status, (name, res)
            assert res.reason == why if status == "skipped" else why in res.actions, (name, res)
    bomb = clean_image(good, max_pixels=1000)
    assert bomb.reason == "decompression_bomb"


def test_structural_check_insists_on_strict_base64():
    data = _save(_picture(), "JPEG")
    url = base64.urlsafe_b64encode(data)
    assert clean_b64(url[:100] + b"*" + url[101:]).reason == "invalid_base64"
    assert clean_b64(url[:100] + b"=" + url[101:]).reason == "invalid_base64"  # padding in the middle
    assert not jpeg_b64_info(url[:-4]).complete  # whole groups, but the end marker is gone
    wrapped = b"\n".join(url[i : i + 76] for i in range(0, len(url), 76))  # MIME line breaks
    assert jpeg_b64_info(wrapped) is None
    res = clean_b64(wrapped)  # not strict: decoded the tolerant way and stored canonical
    assert res.status == "kept" and res.data == url


def test_default_pixel_limit_is_pils_and_checking_needs_no_pil():
    """The bomb limit mirrors PIL's (PIL is imported lazily: a clean TSV is checked without it)."""
    from PIL import Image

    from solution.data import images

    assert images.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    code = "import sys, solution.prepare; assert 'PIL' not in sys.modules, 'PIL imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
