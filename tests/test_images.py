"""inspect_image / reencode_to_jpeg on tiny files of every kind MEDIC is known to contain."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medicsynth.images import MIN_SIDE, inspect_image, jpeg_sof, reencode_to_jpeg, to_rgb

W, H = 40, 24  # tiny but non-square, so a transposition would show


def _rgb(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(**kwargs) -> bytes:
    buf = io.BytesIO()
    _rgb().save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, im: Image.Image, fmt: str, **kwargs) -> Path:
    im.save(path, format=fmt, **kwargs)
    return path


def _truncated(path: Path) -> Path:
    data = _jpeg_bytes()
    return _write(path, data[: len(data) * 2 // 3])


def _corrupt_scan(path: Path) -> Path:
    # A stray SOF9 marker inside the entropy-coded data: libjpeg gives up on the stream.
    data = bytearray(_jpeg_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 30 : sos + 32] = b"\xff\xc9"
    return _write(path, bytes(data))


def _sixteen_bit(path: Path) -> Path:
    arr = np.full((H, W), 32768, dtype=np.uint16)
    arr[:, : W // 2] = 65535
    return _save(path, Image.fromarray(arr), "PNG")


def _la(path: Path) -> Path:
    return _save(path, Image.new("LA", (W, H), (10, 128)), "PNG")


def _palette_transparent(path: Path) -> Path:
    im = _rgb().convert("P")
    return _save(path, im, "PNG", transparency=0)


# name, builder(path) -> path, expected status, expected reason
CASES = [
    ("good.jpg", lambda p: _write(p, _jpeg_bytes()), "ok", ""),
    ("progressive.jpg", lambda p: _write(p, _jpeg_bytes(progressive=True)), "ok", ""),
    ("zero.jpg", lambda p: _write(p, b""), "reject", "empty_file"),
    ("truncated.jpg", _truncated, "reject", "truncated"),
    ("cut_in_header.jpg", lambda p: _write(p, _jpeg_bytes()[:300]), "reject", "truncated"),
    ("corrupt.jpg", _corrupt_scan, "reject", "decode_error"),
    ("text.jpg", lambda p: _write(p, b"<html>404 not found</html>"), "reject", "unidentified"),
    ("tiny.jpg", lambda p: _save(p, Image.new("RGB", (W, MIN_SIDE - 1)), "JPEG"),
     "reject", "too_small"),
    ("gif.jpg", lambda p: _save(p, _rgb(), "GIF"), "reencode", "format_gif"),
    ("png.jpg", lambda p: _save(p, _rgb(), "PNG"), "reencode", "format_png"),
    ("rgba.png", lambda p: _save(p, _rgb().convert("RGBA"), "PNG"), "reencode", "format_png"),
    ("webp.jpg", lambda p: _save(p, _rgb(), "WEBP"), "reencode", "format_webp"),
    ("image.bmp", lambda p: _save(p, _rgb(), "BMP"), "reencode", "format_bmp"),
    ("cmyk.jpg", lambda p: _save(p, _rgb().convert("CMYK"), "JPEG"), "reencode", "mode_cmyk"),
    ("gray.jpg", lambda p: _save(p, _rgb().convert("L"), "JPEG"), "reencode", "mode_l"),
    ("sixteen.png", _sixteen_bit, "reencode", "format_png"),
    ("la.png", _la, "reencode", "format_png"),
    ("palette.png", _palette_transparent, "reencode", "format_png"),
]


@pytest.mark.parametrize("name,build,status,reason", CASES, ids=[c[0] for c in CASES])
def test_inspect_classifies_by_content(tmp_path, name, build, status, reason):
    check = inspect_image(build(tmp_path / name))
    assert (check.status, check.reason) == (status, reason), check.detail
    if status != "reject":
        assert check.size == (W, H)


def test_missing_file_is_rejected(tmp_path):
    check = inspect_image(tmp_path / "nope.jpg")
    assert (check.status, check.reason) == ("reject", "missing")
    assert "nope.jpg" in check.detail


def test_too_many_pixels_is_rejected(tmp_path):
    path = _write(tmp_path / "big.jpg", _jpeg_bytes())
    check = inspect_image(path, max_pixels=W * H - 1)
    assert (check.status, check.reason) == ("reject", "too_large")


def test_jpeg_sof_reads_frame_type(tmp_path):
    assert jpeg_sof(_write(tmp_path / "b.jpg", _jpeg_bytes())) == (0xC0, 8)
    assert jpeg_sof(_write(tmp_path / "p.jpg", _jpeg_bytes(progressive=True))) == (0xC2, 8)
    assert jpeg_sof(_save(tmp_path / "x.png", _rgb(), "PNG")) is None


def test_arithmetic_coded_jpeg_is_not_ok(tmp_path):
    # Pillow cannot write arithmetic coding; relabel the frame header as SOF9 instead. Whatever
    # Pillow then makes of the scan, such a file must never be passed to DALI as is.
    data = bytearray(_jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = 0xC9
    check = inspect_image(_write(tmp_path / "arith.jpg", bytes(data)))
    assert check.status in ("reencode", "reject")
    if check.status == "reencode":
        assert check.reason == "jpeg_arithmetic_or_hierarchical"


def _assert_plain_rgb_jpeg(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    with Image.open(path) as im:
        im.load()
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", size)
    assert jpeg_sof(path) == (0xC0, 8)  # baseline
    assert inspect_image(path).status == "ok"


@pytest.mark.parametrize(
    "name,build", [(c[0], c[1]) for c in CASES if c[2] == "reencode"],
    ids=[c[0] for c in CASES if c[2] == "reencode"],
)
def test_reencode_gives_baseline_rgb_jpeg(tmp_path, name, build):
    src = build(tmp_path / name)
    dst = tmp_path / "out" / "sub" / (name + ".jpg")
    reencode_to_jpeg(src, dst, quality=90)
    _assert_plain_rgb_jpeg(dst, (W, H))
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temp file left behind


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (W, H), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 0, 255, 255), (0, 0, W // 2, H))  # opaque blue left half
    src = _save(tmp_path / "a.png", im, "PNG")
    reencode_to_jpeg(src, tmp_path / "a.jpg")
    arr = np.asarray(Image.open(tmp_path / "a.jpg")).astype(int)
    assert np.abs(arr[H // 2, W - 5] - [255, 255, 255]).max() < 12
    assert np.abs(arr[H // 2, 5] - [0, 0, 255]).max() < 24


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    src = _sixteen_bit(tmp_path / "s.png")
    with Image.open(src) as im:
        assert im.mode.startswith("I")
    reencode_to_jpeg(src, tmp_path / "s.jpg")
    arr = np.asarray(Image.open(tmp_path / "s.jpg")).astype(int)
    assert abs(arr[H // 2, 3, 0] - 255) <= 3
    assert abs(arr[H // 2, W - 3, 0] - 128) <= 3  # 32768/257; plain clipping would give 255


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 0, 255))]
    src = tmp_path / "anim.jpg"
    frames[0].save(src, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    assert inspect_image(src).reason == "format_gif"
    reencode_to_jpeg(src, tmp_path / "anim_out.jpg")
    r, g, b = np.asarray(Image.open(tmp_path / "anim_out.jpg"))[H // 2, W // 2].astype(int)
    assert r > 200 and b < 60


def test_cmyk_colours_survive(tmp_path):
    src = _save(tmp_path / "c.jpg", Image.new("RGB", (W, H), (200, 30, 30)).convert("CMYK"), "JPEG")
    reencode_to_jpeg(src, tmp_path / "c_out.jpg")
    r, g, b = np.asarray(Image.open(tmp_path / "c_out.jpg"))[H // 2, W // 2].astype(int)
    assert r > 150 and g < 90 and b < 90


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    src = _save(tmp_path / "o.png", _rgb(), "PNG", exif=exif)
    reencode_to_jpeg(src, tmp_path / "o.jpg")
    assert Image.open(tmp_path / "o.jpg").size == (H, W)


def test_reencode_of_broken_file_raises_and_writes_nothing(tmp_path):
    src = _truncated(tmp_path / "t.jpg")
    dst = tmp_path / "out" / "t.jpg"
    with pytest.raises(OSError):
        reencode_to_jpeg(src, dst)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []


def test_to_rgb_leaves_rgb_alone():
    im = _rgb()
    assert to_rgb(im) is im
