"""pipeline.images: decoding any common image to (H, W, 3) uint8 RGB, listing, fingerprints, label PNGs.

Every image is generated here into tmp_path; no binary files are committed.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.images import (BadImage, dataset_fingerprint, fingerprint, list_images, load_rgb, read_label_png,
                             stem_of, write_label_png)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def assert_rgb(array, shape_hw):
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8
    assert array.shape == (*shape_hw, 3)


def close(pixel, expected, tol=0):
    return np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected, dtype=int)) <= tol)


# ---------------------------------------------------------------- load_rgb: formats


def test_rgb_jpeg(tmp_path):
    array = np.zeros((24, 40, 3), np.uint8)
    array[:, :20] = RED
    array[:, 20:] = BLUE
    path = tmp_path / "photo.jpg"
    Image.fromarray(array).save(path, quality=95)
    rgb = load_rgb(path)
    assert_rgb(rgb, (24, 40))
    assert close(rgb[12, 5], RED, tol=12)
    assert close(rgb[12, 35], BLUE, tol=12)


def test_grayscale_png(tmp_path):
    gray = np.array([[0, 50], [200, 255]], np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    rgb = load_rgb(path)
    assert_rgb(rgb, (2, 2))
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_png_composites_transparent_pixels_onto_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (0, 0, 0, 0)  # fully transparent black: hidden colour must not show
    rgba[:, 3:] = (10, 200, 30, 255)  # opaque
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    rgb = load_rgb(path)
    assert_rgb(rgb, (4, 6))
    assert (rgb[:, :3] == 255).all()
    assert (rgb[:, 3:] == (10, 200, 30)).all()


def test_gray_alpha_png_composites_onto_white(tmp_path):
    la = Image.new("LA", (3, 2), (0, 0))
    la.putpixel((0, 0), (100, 255))
    path = tmp_path / "la.png"
    la.save(path)
    rgb = load_rgb(path)
    assert_rgb(rgb, (2, 3))
    assert (rgb[0, 0] == 100).all()
    assert (rgb[1, 2] == 255).all()


def test_palette_png(tmp_path):
    indices = np.array([[0, 1], [2, 1]], np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (253 * 3))
    path = tmp_path / "palette.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    rgb = load_rgb(path)
    assert_rgb(rgb, (2, 2))
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    assert tuple(rgb[0, 1]) == (200, 100, 50)
    assert tuple(rgb[1, 0]) == (0, 255, 0)


def test_palette_png_with_transparency_composites_onto_white(tmp_path):
    indices = np.array([[0, 1]], np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (254 * 3))
    path = tmp_path / "palette_t.png"
    image.save(path, transparency=0)
    rgb = load_rgb(path)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (200, 100, 50)


def test_one_bit_png(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    rgb = load_rgb(path)
    assert_rgb(rgb, (2, 3))
    np.testing.assert_array_equal(rgb[..., 0], np.where(bits, 255, 0))
    np.testing.assert_array_equal(rgb[..., 2], np.where(bits, 255, 0))


def test_sixteen_bit_grayscale_png(tmp_path):
    values = np.array([[0, 65535], [65535, 0], [32768, 257]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = load_rgb(path)
    assert_rgb(rgb, (3, 2))
    assert (rgb[0, 0] == 0).all()
    assert (rgb[0, 1] == 255).all()
    assert (rgb[1, 0] == 255).all()
    assert (rgb[1, 1] == 0).all()
    assert abs(int(rgb[2, 0, 0]) - 128) <= 1  # mid-grey, not clipped to 255
    assert int(rgb[2, 1, 0]) == 1  # scaled by 255/65535, not truncated to the low byte


def test_cmyk_jpeg(tmp_path):
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # cyan 0, magenta+yellow full: red
    path = tmp_path / "cmyk.jpg"
    image.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    rgb = load_rgb(path)
    assert_rgb(rgb, (8, 16))
    assert close(rgb[4, 8], RED, tol=10)


def _exif_jpeg(path, orientation: int):
    """A 20 (H) x 40 (W) JPEG, left half red and right half blue, with an EXIF orientation tag."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = RED
    array[:, 20:] = BLUE
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    path = tmp_path / "rot6.jpg"
    _exif_jpeg(path, 6)
    with Image.open(path) as stored:
        assert stored.size == (40, 20)  # stored pixels: 40 wide, 20 high
    rgb = load_rgb(path)
    assert_rgb(rgb, (40, 20))  # height and width swapped
    # rotated 90 degrees clockwise for display: the stored left (red) half is now on top
    assert close(rgb[5, 10], RED, tol=12)
    assert close(rgb[35, 10], BLUE, tol=12)


def test_exif_orientation_8_rotates_counter_clockwise(tmp_path):
    path = tmp_path / "rot8.jpg"
    _exif_jpeg(path, 8)
    rgb = load_rgb(path)
    assert_rgb(rgb, (40, 20))
    assert close(rgb[5, 10], BLUE, tol=12)
    assert close(rgb[35, 10], RED, tol=12)


def test_exif_orientation_1_is_unchanged(tmp_path):
    path = tmp_path / "rot1.jpg"
    _exif_jpeg(path, 1)
    assert_rgb(load_rgb(path), (20, 40))


# ---------------------------------------------------------------- load_rgb: bad files


def _valid_jpeg_bytes(tmp_path) -> bytes:
    rng = np.random.default_rng(0)
    path = tmp_path / "noise_source.jpg"
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def _assert_bad(path):
    with pytest.raises(BadImage) as info:
        load_rgb(path)
    reason = str(info.value)
    assert reason.strip(), "the reason must not be empty"
    assert "\n" not in reason, f"the reason must be one line: {reason!r}"
    return reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in _assert_bad(path)


def test_truncated_jpeg(tmp_path):
    data = _valid_jpeg_bytes(tmp_path)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[:len(data) // 2])
    _assert_bad(path)


def test_random_bytes_with_jpg_suffix(tmp_path):
    path = tmp_path / "random.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_bad(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\nsecond line\n")
    _assert_bad(path)


def test_bad_image_is_not_a_pipeline_error():
    """BadImage is per-image (skipped unless strict), not a user-facing fatal error."""
    from pipeline.errors import PipelineError
    assert not issubclass(BadImage, PipelineError)


# ---------------------------------------------------------------- list_images


def _touch_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8), mode="L").save(path, format="PNG")


def test_list_images_recursive_sorted_filtered(tmp_path):
    root = tmp_path / "photos"
    _touch_png(root / "b.png")
    _touch_png(root / "a" / "z" / "d.jpeg")
    _touch_png(root / "a" / "c.JPG")  # uppercase suffix
    _touch_png(root / "A.PNG")
    _touch_png(root / "e.webp")
    (root / "notes.txt").write_text("hello")
    (root / "a" / "data.npy").write_bytes(b"\x93NUMPY")
    (root / "README").write_text("no suffix")
    (root / "folder.png").mkdir()  # a directory named like an image is not an image
    records = list_images(root)
    rels = [r.rel for r in records]
    assert rels == sorted(["b.png", "a/z/d.jpeg", "a/c.JPG", "A.PNG", "e.webp"])
    for record in records:
        assert record.path.is_absolute()
        assert record.path == (root / record.rel).resolve()
    by_rel = {r.rel: r for r in records}
    assert by_rel["a/z/d.jpeg"].stem == "a/z/d"
    assert stem_of("x/y.tar.png") == "x/y.tar"


def test_list_images_accepts_str(tmp_path):
    _touch_png(tmp_path / "one.png")
    assert [r.rel for r in list_images(str(tmp_path))] == ["one.png"]


def test_list_images_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as info:
        list_images(missing)
    assert str(missing) in str(info.value)


def test_list_images_on_a_file(tmp_path):
    path = tmp_path / "x.png"
    _touch_png(path)
    with pytest.raises(InputError):
        list_images(path)


def test_list_images_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with pytest.raises(InputError, match="no images"):
        list_images(tmp_path)


# ---------------------------------------------------------------- fingerprints


def _one(root, hash_content=False):
    (record,) = list_images(root, hash_content=hash_content)
    return record.fingerprint


def test_fingerprint_changes_with_content_and_mtime(tmp_path):
    path = tmp_path / "img.png"
    _touch_png(path, 0)
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    first = _one(tmp_path)
    assert _one(tmp_path) == first  # stable when nothing changes

    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    after_touch = _one(tmp_path)
    assert after_touch != first  # mtime changed

    path.write_bytes(path.read_bytes() + b"extra")  # content (and size) changed
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert _one(tmp_path) != after_touch


def test_fingerprint_names_the_image(tmp_path):
    _touch_png(tmp_path / "a.png")
    _touch_png(tmp_path / "b.png")
    os.utime(tmp_path / "a.png", ns=(1, 1))
    os.utime(tmp_path / "b.png", ns=(1, 1))
    a, b = list_images(tmp_path)
    assert a.fingerprint != b.fingerprint  # same size and mtime, different names


def test_hash_content_ignores_mtime_but_not_content(tmp_path):
    path = tmp_path / "img.png"
    _touch_png(path, 0)
    first = _one(tmp_path, hash_content=True)
    os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    assert _one(tmp_path, hash_content=True) == first  # only mtime changed
    assert _one(tmp_path, hash_content=False) != first  # the modes differ

    # Same size, same mtime, different content: only the content hash notices.
    stat = path.stat()
    size_mtime = _one(tmp_path, hash_content=False)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    assert _one(tmp_path, hash_content=False) == size_mtime
    assert _one(tmp_path, hash_content=True) != first


def test_hash_content_equals_for_identical_bytes(tmp_path):
    _touch_png(tmp_path / "x" / "img.png", 7)
    _touch_png(tmp_path / "y" / "img.png", 7)
    fx = fingerprint(tmp_path / "x" / "img.png", "img.png", True)
    fy = fingerprint(tmp_path / "y" / "img.png", "img.png", True)
    assert fx == fy


def test_dataset_fingerprint_depends_on_every_record(tmp_path):
    _touch_png(tmp_path / "a.png")
    _touch_png(tmp_path / "b.png")
    records = list_images(tmp_path)
    full = dataset_fingerprint(records)
    assert dataset_fingerprint(records) == full
    assert dataset_fingerprint(records[:1]) != full
    os.utime(tmp_path / "b.png", ns=(1, 1))
    assert dataset_fingerprint(list_images(tmp_path)) != full


# ---------------------------------------------------------------- label PNGs


def test_label_png_round_trip(tmp_path):
    labels = np.array([[0, 1, 2, 3], [4, 5, 255, 0], [5, 5, 255, 1]], np.uint8)
    path = tmp_path / "sub" / "labels.png"  # parent folders are created
    write_label_png(path, labels)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.format == "PNG"
        palette = image.getpalette()
        assert palette[255 * 3:255 * 3 + 3] == [255, 255, 255]  # ignore is white
        assert palette[0:3] == [0, 0, 0]
    back = read_label_png(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)


def test_label_png_round_trip_from_int64(tmp_path):
    labels = np.arange(12, dtype=np.int64).reshape(3, 4) % 6
    path = tmp_path / "labels.png"
    write_label_png(path, labels)
    np.testing.assert_array_equal(read_label_png(path), labels.astype(np.uint8))


def test_read_label_png_accepts_gray(tmp_path):
    labels = np.array([[0, 3], [255, 1]], np.uint8)
    path = tmp_path / "gray_labels.png"
    Image.fromarray(labels, mode="L").save(path)
    np.testing.assert_array_equal(read_label_png(path), labels)


def test_read_label_png_rejects_rgb(tmp_path):
    path = tmp_path / "colour_labels.png"
    Image.new("RGB", (4, 4), (128, 0, 0)).save(path)
    with pytest.raises(InputError) as info:
        read_label_png(path)
    assert str(path) in str(info.value)


def test_read_label_png_unreadable(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("not a png")
    with pytest.raises(InputError) as info:
        read_label_png(path)
    assert str(path) in str(info.value)


# What each EXIF orientation means for display, from the EXIF spec, written independently of Pillow.
EXIF_DISPLAY = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
                5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
                8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_displayed_as_the_spec_says(tmp_path, orientation):
    stored = np.zeros((32, 48, 3), np.uint8)  # four 16x24 quadrants: no symmetry hides a wrong transform
    stored[:16, :24], stored[:16, 24:], stored[16:, :24], stored[16:, 24:] = RED, BLUE, (0, 255, 0), (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif, quality=98)
    expected = EXIF_DISPLAY[orientation](stored)
    decoded = load_rgb(tmp_path / "o.jpg")
    assert decoded.shape == expected.shape

    def quadrant_means(a):  # JPEG blurs colours across the quadrant edges, so compare the quadrants' means
        h, w = a.shape[0] // 2, a.shape[1] // 2
        return a.reshape(2, h, 2, w, 3).mean(axis=(1, 3))
    assert np.abs(quadrant_means(decoded.astype(float)) - quadrant_means(expected.astype(float))).max() < 25
