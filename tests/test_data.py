"""Image decoding and image folders: every way a user's folder can be odd or broken."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlopt.data import (
    DataWarning,
    check_source,
    format_report,
    is_image_file,
    load_rgb,
    open_source,
    resize_square,
)
from tlopt.errors import BadImage, DataError

RNG = np.random.default_rng(0)


def noise(width: int = 32, height: int = 24) -> Image.Image:
    """A random RGB picture: JPEG cannot compress it to almost nothing."""
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def jpeg_bytes(img: Image.Image | None = None, **options: object) -> bytes:
    buffer = io.BytesIO()
    (img or noise()).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def save(path: Path, img: Image.Image | None = None, fmt: str | None = None, **options: object):
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or noise()).save(path, fmt, **options)
    return path


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corrupt_jpeg() -> bytes:
    """A valid JPEG header (through the start-of-scan segment) followed by random bytes."""
    data = jpeg_bytes()
    sos = data.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return data[:header_end] + np.random.default_rng(1).bytes(1500)


def reason_of(path: Path) -> str:
    with pytest.raises(BadImage) as caught:
        load_rgb(path)
    return caught.value.reason


def one_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        func(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- load_rgb ---------------------------------------------------------------------------------


def test_image_suffixes_any_case():
    assert is_image_file("a/B.JPG") and is_image_file("x.TiFf") and is_image_file("y.webp")
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a picture\n", "not an image (cannot identify format)"),
        ("half.jpg", jpeg_bytes()[:400], "truncated image data"),
        ("corrupt.jpg", corrupt_jpeg(), "corrupt image data"),
        ("header.png", b"\x89PNG\r\n\x1a\n" + bytes(40), "corrupt image header"),
    ],
)
def test_unreadable_files_give_a_short_reason(tmp_path, name, data, reason):
    assert reason_of(write(tmp_path / name, data)).startswith(reason)


def test_truncated_jpeg_cut_in_half(tmp_path):
    data = jpeg_bytes(noise(64, 64))
    assert reason_of(write(tmp_path / "half.jpg", data[: len(data) // 2])) == "truncated image data"


@pytest.mark.parametrize(("side", "path"), [(12, "warning"), (20, "error")])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side, path):
    # 12 x 12 = 144 pixels: Pillow only warns (limit 100); 20 x 20 = 400: above 2x, Pillow raises.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image = save(tmp_path / "big.png", Image.new("RGB", (side, side)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        reason = reason_of(image)
    assert reason == f"too large ({side} x {side} pixels, above Pillow's limit of 100)"


def test_symlink_loop_and_missing_file(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(tmp_path / "loop.jpg")
    assert reason_of(loop) == "too many levels of symbolic links"
    assert reason_of(tmp_path / "gone.jpg") == "no such file or directory"


def test_unreadable_permission(tmp_path, monkeypatch):
    image = save(tmp_path / "locked.png")
    if os.geteuid() == 0:  # root reads any file, so make the read fail as it would for a user

        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", denied)
    image.chmod(0)
    try:
        assert reason_of(image) == "permission denied"
    finally:
        image.chmod(0o644)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    image = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    rgb = load_rgb(image)
    assert rgb.mode == "RGB"
    red, green, blue = np.asarray(rgb)[4, 4]
    assert red > 200 and green < 60 and blue < 60


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    pixels = np.asarray(load_rgb(save(tmp_path / "rgba.png", rgba)))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [255, 0, 0]

    grey_alpha = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(load_rgb(save(tmp_path / "la.png", grey_alpha))).min() == 255


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    path = save(tmp_path / "palette.png", palette, transparency=0)
    pixels = np.asarray(load_rgb(path))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[2, 2].tolist() == [0, 0, 255]
    gif = save(tmp_path / "palette.gif", palette)
    assert load_rgb(gif).mode == "RGB"


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")  # Pillow reads 16-bit PNG as I;16
    pixels = np.asarray(load_rgb(path))
    assert pixels[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_float_and_32_bit_grey(tmp_path):
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(load_rgb(save(tmp_path / "f.tif", floats)))[0, :, 0].tolist() == [0, 128, 255]
    ints = Image.fromarray(np.array([[-10, 0, 10]], dtype=np.int32))
    assert np.asarray(load_rgb(save(tmp_path / "i.tif", ints)))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel(tmp_path, mode):
    img = Image.new(mode, (3, 3), 255 if mode == "L" else 1)
    pixels = np.asarray(load_rgb(save(tmp_path / f"{mode}.png", img)))
    assert pixels.shape == (3, 3, 3) and (pixels == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = write(tmp_path / "rotated.jpg", jpeg_bytes(noise(40, 20), exif=exif))
    assert Image.open(path).size == (40, 20)
    assert load_rgb(path).size == (20, 40)


def test_resize_square_crops_the_centre():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    square = resize_square(img, 50)
    assert square.shape == (50, 50, 3) and square.dtype == np.uint8
    assert (square[:, 5:45, 0] > 250).all() and (square[:, 5:45, 2] < 5).all()
    assert resize_square(Image.new("L", (7, 9), 9), 4).shape == (4, 4, 3)


# --- image folders ----------------------------------------------------------------------------


def messy_folder(root: Path) -> Path:
    """Two classes with every odd and broken file a real folder may hold."""
    for i in range(10):
        save(root / "cats" / f"{i:02d}.jpg")
        save(root / "dögs and wölves" / f"{i:02d}.png")
    save(root / "cats" / "cmyk.jpg", Image.new("CMYK", (8, 8)))
    save(root / "cats" / "sub" / "rgba.png", Image.new("RGBA", (8, 8)))
    save(root / "cats" / "grey.bmp", Image.new("L", (8, 8)))
    save(root / "dögs and wölves" / "deep.png", Image.fromarray(np.zeros((4, 4), np.uint16)))
    palette = Image.new("P", (8, 8))
    save(root / "dögs and wölves" / "palette.png", palette, transparency=0)
    write(root / "cats" / "empty.jpg", b"")
    write(root / "cats" / "text.JPG", b"hello")
    write(root / "dögs and wölves" / "half.jpg", jpeg_bytes(noise(64, 64))[:500])
    write(root / "dögs and wölves" / "notes.txt", b"not an image, ignored")
    write(root / "cats" / ".DS_Store", b"\0\0")
    save(root / ".ipynb_checkpoints" / "x.png")
    save(root / "cats" / ".ipynb_checkpoints" / "x-checkpoint.png")
    save(root / "__MACOSX" / "cats" / "._00.jpg")
    return root


def test_messy_folder(tmp_path):
    root = messy_folder(tmp_path / "pets")
    with pytest.warns(DataWarning, match="skipped 3 unreadable"):
        source = open_source("folder", root, max_bad_fraction=0.2)
    assert source.classes == ("cats", "dögs and wölves")
    assert dict(source.skipped) == {
        "cats/empty.jpg": "empty file",
        "cats/text.JPG": "not an image (cannot identify format)",
        "dögs and wölves/half.jpg": "truncated image data",
    }
    assert dict(source.converted) == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1}
    assert len(source.items) == 25 and source.ignored == 2  # notes.txt, .DS_Store
    assert not any("ipynb" in item.key or "MACOSX" in item.key for item in source.items)
    assert all(source.load(item).mode == "RGB" for item in source.items)
    assert source.counts()["train"]["cats"] + source.counts()["val"]["cats"] < 13
    assert len(source.sizes) == len(source.items)


def test_too_many_unreadable_files(tmp_path):
    root = messy_folder(tmp_path / "pets")
    message = one_line_error(open_source, "folder", root)  # 3 of 28 > 10%
    assert "3 of 28 image files" in message and "tlopt data check" in message


def test_split_is_stratified_seeded_and_complete(tmp_path):
    for k, (name, count) in enumerate((("a", 50), ("b", 20), ("tiny", 1))):
        for i in range(count):
            save(tmp_path / name / f"{i}.png", Image.new("RGB", (4, 4), (i, k, 0)))
    source = open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    counts = source.counts()
    assert [counts[s]["a"] for s in ("train", "val", "test")] == [35, 10, 5]
    assert [counts[s]["b"] for s in ("train", "val", "test")] == [14, 4, 2]
    assert [counts[s]["tiny"] for s in ("train", "val", "test")] == [1, 0, 0]
    again = open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert again.items == source.items and again.fingerprint == source.fingerprint
    other_seed = open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert other_seed.fingerprint != source.fingerprint
    assert [item.split for item in source.items] == sorted(
        (item.split for item in source.items), key=["train", "val", "test"].index
    )
    no_test = open_source("folder", tmp_path, test_fraction=0.0)
    assert set(no_test.counts()) == {"train", "val"}
    assert no_test.split_items("test") == []


def test_fingerprint_follows_file_bytes(tmp_path):
    for k, name in enumerate(("a", "b")):
        for i in range(3):
            save(tmp_path / name / f"{i}.png", Image.new("RGB", (4, 4), (i, k, 9)))
    first = open_source("folder", tmp_path).fingerprint
    assert open_source("folder", tmp_path).fingerprint == first
    save(tmp_path / "a" / "1.png", Image.new("RGB", (4, 4), (200, 9, 9)))
    assert open_source("folder", tmp_path).fingerprint != first


def test_pre_split_folder_with_valid_alias_and_test(tmp_path):
    for split, count in (("train", 6), ("valid", 2), ("test", 2)):
        for name in ("ants", "bees"):
            for i in range(count):
                save(tmp_path / split / name / f"{i}.jpg")
    source = open_source("folder", tmp_path)
    assert source.counts() == {
        "train": {"ants": 6, "bees": 6},
        "val": {"ants": 2, "bees": 2},
        "test": {"ants": 2, "bees": 2},
    }
    assert source.split_items("val")[0].key == "valid/ants/0.jpg"


def test_train_only_folder_gets_val_carved(tmp_path):
    for k, name in enumerate(("ants", "bees")):
        for i in range(10):
            save(tmp_path / "train" / name / f"{i}.png", Image.new("RGB", (4, 4), (i, k, 0)))
    counts = open_source("folder", tmp_path, val_fraction=0.3).counts()
    assert counts == {"train": {"ants": 7, "bees": 7}, "val": {"ants": 3, "bees": 3}}


def test_duplicates_across_splits_warn(tmp_path):
    picture = noise()
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            save(tmp_path / split / name / "0.png", noise())
        save(tmp_path / split / "ants" / "same.png", picture)
    with pytest.warns(DataWarning, match="1 image"):
        assert open_source("folder", tmp_path).duplicates == 1


def test_symlinks_files_followed_folder_loops_ignored(tmp_path):
    for name in ("a", "b"):
        save(tmp_path / "data" / name / "0.png")
    (tmp_path / "data" / "a" / "link.png").symlink_to(tmp_path / "data" / "b" / "0.png")
    (tmp_path / "data" / "a" / "loop").symlink_to(tmp_path / "data" / "a")
    source = open_source("folder", tmp_path / "data", val_fraction=0.5)
    assert sorted(item.key for item in source.items) == ["a/0.png", "a/link.png", "b/0.png"]
    split_of = {item.key: item.split for item in source.items}
    assert split_of["a/link.png"] == split_of["b/0.png"]  # link and target: same bytes, one split


def test_byte_identical_files_stay_in_one_split_and_are_counted(tmp_path, caplog):
    """Twins (a copied photo) in a folder tlopt splits: each picture in one split, the split
    still stratified and seeded; said once, with where they went."""
    pictures = [noise() for _ in range(6)]
    for name in ("ants", "bees"):
        for i in range(20):
            save(tmp_path / name / f"{i:02d}.png", noise())
        for j, picture in enumerate(pictures[:3] if name == "ants" else pictures[3:]):
            for copy in range(3):  # three copies of each: 9 twins per class
                save(tmp_path / name / f"twin{j}-{copy}.png", picture)
    with caplog.at_level("INFO", logger="tlopt.data"):
        source = open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert source.duplicates == 0
    by_picture: dict[str, set[str]] = {}
    for item in source.items:
        if "twin" in item.key:
            by_picture.setdefault(item.key.split("-")[0], set()).add(item.split)
    assert len(by_picture) == 6 and all(len(s) == 1 for s in by_picture.values()), by_picture
    counts = source.counts()
    for name in ("ants", "bees"):  # 29 files a class: val and test near 6 each
        assert 4 <= counts["val"][name] <= 8 and 4 <= counts["test"][name] <= 8, counts
    said = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert len(said) == 1 and "18 files in" in said[0] and "copies of 6 pictures" in said[0]
    assert "6 kept in one split (" in said[0], said
    with caplog.at_level("INFO", logger="tlopt.data"):  # a run opens it again: not said again
        again = open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)
        open_source("folder", tmp_path, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert again.fingerprint == source.fingerprint
    said = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert len(said) == 1, said


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({}, "does not exist: check data.path"),
        ({"loose.png": True}, "no class folders in"),
        ({"a/0.png": True}, "found only one class 'a' in"),
        ({"a/0.png": True, "b/0.png": False}, "class 'b' in"),
        ({"a/0.png": True, "b/x.txt": True}, "class 'b' in"),
        (
            {
                "train/a/0.png": True,
                "train/b/0.png": True,
                "val/a/0.png": True,
                "val/c/0.png": True,
            },
            "only in train: 'b'; only in val: 'c'",
        ),
        ({"val/a/0.png": True, "val/b/0.png": True}, "has 'val' but no 'train' folder"),
    ],
)
def test_folder_errors_are_one_line(tmp_path, layout, expected):
    root = tmp_path / "data"
    for relative, good in layout.items():
        if relative.endswith(".png"):
            write(root / relative, jpeg_bytes() if good else b"")
        else:
            write(root / relative, b"text")
    assert expected in one_line_error(open_source, "folder", root, max_bad_fraction=1.0)


def test_empty_class_names_the_unreadable_file(tmp_path):
    save(tmp_path / "a" / "0.png")
    write(tmp_path / "b" / "0.png", b"")
    message = one_line_error(open_source, "folder", tmp_path, max_bad_fraction=1.0)
    assert "class 'b'" in message and "b/0.png: empty file" in message


def test_bad_settings_and_kinds(tmp_path):
    assert "use one of folder, digits, cifar10" in one_line_error(open_source, "imagenet", tmp_path)
    assert "val_fraction" in one_line_error(open_source, "digits", val_fraction=0.0)
    assert "below 1" in one_line_error(open_source, "digits", val_fraction=0.6, test_fraction=0.4)
    assert "needs a path" in one_line_error(open_source, "folder")


# --- check ------------------------------------------------------------------------------------


def test_check_report_lists_unreadable_files(tmp_path):
    root = messy_folder(tmp_path / "pets")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the report says it all; no warnings on top
        report = check_source("folder", root)  # 3 of 28 unreadable: listed, not refused
    assert not report.usable and report.sizes is not None
    assert (report.sizes.min_width, report.sizes.max_width) == (4, 32)
    text = format_report(report)
    assert "3 unreadable files skipped:" in text
    assert "  dögs and wölves/half.jpg: truncated image data" in text
    assert "converted to RGB: CMYK 1, I;16 1, L 1, P 1, RGBA 1" in text
    header = text.splitlines()[1].split()
    assert header == ["class", "train", "val", "test", "total"]
    assert text.splitlines()[4].split()[0] == "total"


def test_a_verified_folder_is_hashed_not_decoded_again(tmp_path, monkeypatch):
    """With ``verified``, the second read decodes only files whose bytes it has not seen."""
    import tlopt.data.folder as folder

    root = messy_folder(tmp_path / "pets")
    kept = tmp_path / "cache"
    with pytest.warns(DataWarning, match="skipped 3 unreadable"):
        first = open_source("folder", root, max_bad_fraction=0.2, verified=kept)
    assert (kept / folder.VerifiedImages.NAME).is_file()

    decoded: list[str] = []
    real_decode = folder.decode_rgb

    def counting_decode(data: bytes, name: str):  # the real decoder, counted
        decoded.append(Path(name).name)
        return real_decode(data, name)

    monkeypatch.setattr(folder, "decode_rgb", counting_decode)
    with pytest.warns(DataWarning, match="skipped 3 unreadable"):
        again = open_source("folder", root, max_bad_fraction=0.2, verified=kept)
    assert sorted(decoded) == ["empty.jpg", "half.jpg", "text.JPG"]  # the bad ones only
    assert again.fingerprint == first.fingerprint and again.items == first.items
    assert again.sizes == first.sizes and dict(again.converted) == dict(first.converted)

    decoded.clear()
    write(root / "cats" / "03.jpg", b"no longer a JPEG")  # changed bytes: decoded, and bad
    with pytest.warns(DataWarning, match="skipped 4 unreadable"):
        changed = open_source("folder", root, max_bad_fraction=0.2, verified=kept)
    assert "03.jpg" in decoded and changed.fingerprint != first.fingerprint

    (kept / folder.VerifiedImages.NAME).write_text("{half written")  # a broken record: rebuilt
    decoded.clear()
    with pytest.warns(DataWarning):
        open_source("folder", root, max_bad_fraction=0.2, verified=kept)
    assert len(decoded) == 28
