"""Image input decoding: formats, limits, errors (status + where), EXIF orientation, cheap probing."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from vision_service.images import ImageInputError, ImageLocation, decode_image, load_image_bytes, probe
from vision_service.settings import ImageInputSettings

LIMITS = ImageInputSettings()
WHERE = ImageLocation(message_index=2, part_index=1)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _two_colour(w=40, h=20) -> Image.Image:
    """Left half red, right half blue: rotations are visible in which corner is which colour."""
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))
    return im


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
async def test_data_url_formats(fmt, mime):
    data = _encode(_two_colour(), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    raw = await load_image_bytes(_data_url(data, f"image/{mime}"), LIMITS, WHERE)
    im = decode_image(raw, LIMITS, WHERE)
    assert im.mode == "RGB" and im.size == (40, 20)
    r, g, b = im.getpixel((2, 10))
    assert r > 200 and b < 60


async def test_gif_first_frame_and_rgba_png():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    frames[1].putpalette(frames[0].getpalette())
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)
    rgba = _encode(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG")
    assert decode_image(rgba).getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, as transformers' convert_to_rgb


def _expect(status: int, fn, *args, match: str):
    with pytest.raises(ImageInputError) as ei:
        fn(*args)
    assert ei.value.status == status
    assert str(WHERE) in ei.value.message and "messages[2].content[1]" in ei.value.message
    assert match in ei.value.message
    return ei.value


def test_truncated_png_is_400():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    _expect(400, decode_image, data[: len(data) // 2], LIMITS, WHERE, match="truncated")


async def test_bad_base64_is_400():
    with pytest.raises(ImageInputError) as ei:
        await load_image_bytes("data:image/png;base64,iVBORw0K!!!notbase64", LIMITS, WHERE)
    assert ei.value.status == 400 and "base64" in ei.value.message and str(WHERE) in ei.value.message


async def test_not_an_image_and_bad_urls_are_400():
    _expect(400, decode_image, b"hello, I am text", LIMITS, WHERE, match="not a supported image")
    for url, match in [
        ("data:image/png,rawbytes", "base64"),
        ("/etc/passwd", "local file paths are disabled"),
        ("https://example.com/cat.png", "not allowed"),
        ("ftp://example.com/cat.png", "unsupported image URL"),
    ]:
        with pytest.raises(ImageInputError, match=match) as ei:
            await load_image_bytes(url, LIMITS, WHERE)
        assert ei.value.status == 400


def test_decompression_bomb_refused_from_header():
    # A 20000 x 20000 PNG (400 Mpx) that compresses to a few hundred KB.
    data = _encode(Image.new("L", (20000, 20000)), "PNG", optimize=False)
    assert len(data) < 2_000_000
    err = _expect(413, decode_image, data, LIMITS, WHERE, match="pixels")
    assert "400000000" in err.message
    _expect(413, probe, data, LIMITS, WHERE, match="pixels")


async def test_too_many_bytes_is_413():
    small = ImageInputSettings(max_image_bytes=1000)
    data = _encode(Image.effect_noise((64, 64), 80).convert("RGB"), "PNG")
    assert len(data) > 1000
    with pytest.raises(ImageInputError) as ei:
        await load_image_bytes(_data_url(data), small, WHERE)
    assert ei.value.status == 413 and "1000" in ei.value.message and str(WHERE) in ei.value.message
    _expect(413, decode_image, data, small, WHERE, match="bytes")


# Which colour is at the displayed image's left/right (landscape) or top/bottom (portrait) edge.
@pytest.mark.parametrize(
    ("orientation", "size", "first", "last"),
    [
        (1, (40, 20), "red", "blue"),  # as stored
        (3, (40, 20), "blue", "red"),  # rotated 180
        (6, (20, 40), "red", "blue"),  # displayed rotated 90 clockwise: the stored left edge goes to the top
        (8, (20, 40), "blue", "red"),  # rotated 90 counter-clockwise: the stored left edge goes to the bottom
    ],
)
def test_exif_orientation_applied(orientation, size, first, last):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_two_colour(), "JPEG", exif=exif, quality=95)
    assert probe(data) == size  # the displayed size, from the header only
    im = decode_image(data)
    assert im.size == size
    w, h = size
    a, b = ((2, h // 2), (w - 3, h // 2)) if w > h else ((w // 2, 2), (w // 2, h - 3))
    channel = {"red": 0, "blue": 2}
    assert im.getpixel(a)[channel[first]] > 200 and im.getpixel(b)[channel[last]] > 200


async def test_local_paths_when_enabled(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(_encode(_two_colour(), "PNG"))
    allowed = ImageInputSettings(allow_local_paths=True, local_path_roots=[str(tmp_path)])
    assert probe(await load_image_bytes(str(p), allowed, WHERE)) == (40, 20)
    assert probe(await load_image_bytes(f"file://{p}", allowed, WHERE)) == (40, 20)
    elsewhere = ImageInputSettings(allow_local_paths=True, local_path_roots=[str(tmp_path / "sub")])
    with pytest.raises(ImageInputError, match="outside the allowed"):
        await load_image_bytes(str(p), elsewhere, WHERE)


def test_image_input_error_survives_pickling_across_ray():
    """Raised in the vision replica, re-raised in the ingress: status and message must survive the trip."""
    import pickle

    from vision_service.images import ImageInputError

    e = pickle.loads(pickle.dumps(ImageInputError(413, "messages[0].content[1]: image too large")))
    assert (e.status, e.message, str(e)) == (413, "messages[0].content[1]: image too large", e.message)
