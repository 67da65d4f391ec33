"""The image processor: every PIL mode to RGB, EXIF orientation, the official resize-and-pad, and bad files."""

import io
import os
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from nanovl import DeepSeekVL
from nanovl.config import CLIP_MEAN, CLIP_STD, get_config
from nanovl.image import CachedProcessor, ImageProcessor, load_image, to_rgb


def official_canvas(img: Image.Image, S: int, mean) -> torch.Tensor:
    """Transcription of the official VLMImageProcessor (facts sheet section 8) with torchvision as the resizer."""
    w, h = img.size
    M = max(w, h)
    size = [max(int(h / M * S), 14), max(int(w / M * S), 14)]
    img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    fill = tuple(int(255 * m) for m in mean)
    square = Image.new(img.mode, (S, S), fill)
    w, h = img.size
    square.paste(img, ((S - w) // 2, (S - h) // 2))
    return torch.from_numpy(np.asarray(square).astype(np.float64) / 255).float().permute(2, 0, 1)


@pytest.mark.parametrize("size", [(300, 200), (120, 410), (64, 64), (1000, 30), (300, 201),  # 171 px: odd margins
                                  (30, 1000), (121, 410)])  # the width floored at 14; an odd margin across
def test_resize_and_pad_match_the_official_processor(size):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    proc = ImageProcessor(image_size=256, image_mean=CLIP_MEAN)
    got = proc(img)
    assert got.shape == (3, 256, 256)
    assert torch.allclose(got, official_canvas(img, 256, CLIP_MEAN), atol=1e-6)
    # the pad colour of the released 7B: the CLIP mean as bytes
    assert proc.pad_color == (122, 116, 104)


def test_processor_follows_the_model():
    hybrid = ImageProcessor.for_config(get_config("7b"))
    assert (hybrid.image_size, hybrid.normalize, hybrid.pad_color) == (1024, False, (122, 116, 104))
    released_13b = ImageProcessor.for_config(get_config("1.3b"))
    assert (released_13b.image_size, released_13b.normalize, released_13b.pad_color) == (384, True, (127, 127, 127))
    x = released_13b(Image.new("RGB", (50, 50), (255, 0, 0)))
    assert x.min().item() == -1.0 and x.max().item() == 1.0  # normalised to [-1, 1]: red is (1, -1, -1)
    assert ImageProcessor.for_config(get_config("tiny")).image_size == 256
    # Settings of the wrong kind, built directly (from_dict checks a file's): "false" normalised, being a string,
    # and a mean of two values failed inside PIL, which pads with it
    for kwargs, message in ((dict(normalize="false"), "normalize must be True or False, got 'false'"),
                            (dict(image_mean=(0.5, 0.5)), r"image_mean must be 3 numbers, .*; got \(0.5, 0.5\)"),
                            (dict(image_std=None), "image_std must be 3 numbers, one per colour channel; got None")):
        with pytest.raises(ValueError, match=message):
            ImageProcessor(384, **kwargs)
    # A path of the wrong kind was said to be a corrupt file ("AttributeError ... (is it a corrupt file?)")
    for path, message in ((5, "expected the image's path, got int$"),
                          (Image.new("RGB", (4, 4)), "got Image .for an image already open, ImageProcessor takes")):
        with pytest.raises(ValueError, match=message):
            load_image(path)
    for limit in ("10", 0):  # (0 read as the default limit)
        with pytest.raises(ValueError, match=f"max_pixels must be a whole number of pixels, at least 1; got {limit!r}"):
            load_image("any.png", limit)
    # A preprocessor_config.json without do_normalize normalises, as VLMImageProcessor's default
    assert ImageProcessor.from_dict({"image_size": 384, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}).normalize
    # ... and one without image_mean and image_std takes the class defaults, CLIP's (facts section 8), not SigLIP's
    bare = ImageProcessor.from_dict({"image_size": 1024, "do_normalize": False})
    assert (bare.image_mean, bare.image_std, bare.pad_color) == (CLIP_MEAN, CLIP_STD, (122, 116, 104))
    assert ImageProcessor.from_dict({"image_size": 384, "image_mean": None, "image_std": None,
                                     "do_normalize": False}).pad_color == (127, 127, 127)  # null pads with 127s
    # A SigLIP-only model whose tower normalises (a config's choice; the released 1.3B's does not) gets pixels in
    # [0, 1], padded with its own mean: normalised here too, its tower would see them normalised twice.
    own = get_config("1.3b", **{"siglip.pixel_mean": CLIP_MEAN, "siglip.pixel_std": CLIP_STD})
    assert (ImageProcessor.for_config(own).normalize, ImageProcessor.for_config(own).pad_color) == (False,
                                                                                                 (122, 116, 104))
    with pytest.raises(ValueError, match="image_mean None and image_std None with do_normalize true: normalising "
                                         "needs both"):
        ImageProcessor.from_dict({"image_size": 384, "image_mean": None, "image_std": None})
    # one statistic given and the other left out: the one left out takes its class default, as any field does
    half = ImageProcessor.from_dict({"image_size": 384, "image_std": [0.5] * 3})
    assert (half.image_mean, half.image_std, half.normalize) == (CLIP_MEAN, (0.5, 0.5, 0.5), True)
    for bad, why in [({"do_normalize": "false"}, "do_normalize 'false' is not true or false"),
                     ({"rescale_factor": "x"}, "could not convert string to float"),
                     ({"rescale_factor": 1.0}, "min_size 14 and rescale_factor 1.0 are not supported"),
                     ({"rescale_factor": 1 / 256}, "rescale_factor 0.00390625 are not supported"),
                     ({"min_size": 16}, "min_size 16 and rescale_factor .* are not supported"),
                     ({"image_mean": [0.5, 0.5]}, r"image_mean and image_std need 3 values, got \(0.5, 0.5\)")] + [
            # sizes int() took: 0 made empty tensors, a negative one failed inside PIL, true and 384.9 were cut to 1
            # and 384 unsaid
            ({"image_size": size}, rf"^preprocessor_config.json: image_size must be a whole number of pixels, at "
                                   rf"least 14; got {re.escape(repr(size))}$")
            for size in (0, -384, True, 384.9, "384", 13)] + [
            # statistics that cannot normalise (json.loads reads NaN and Infinity too): named here, where they used
            # to reach the model and be reported as NaN in the image
            ({"image_mean": [0.5] * 3, "image_std": [0.5, std, 0.5]},
             rf"^preprocessor_config.json: image_std \[0.5, {std}, 0.5\] with do_normalize true: the pixels are "
             rf"divided by it, so each value must be a positive, finite number; got {std}$")
            for std in (0.0, -0.2, float("nan"), float("inf"))] + [
            ({"image_mean": [0.5, float("nan"), 0.5], "image_std": [0.5] * 3},
             r"^preprocessor_config.json: image_mean \[0.5, nan, 0.5\] with do_normalize true: the pixels are "
             r"centred on it, so each value must be a finite number; got nan$")]:
        with pytest.raises(ValueError, match=why):
            ImageProcessor.from_dict({"image_size": 384, **bad})
    with pytest.raises(ValueError, match="preprocessor_config.json: expected an object of settings, got list"):
        ImageProcessor.from_dict([1])  # (an AttributeError from d.get)
    # Without normalising they divide nothing (the mean still gives the pad colour), so they are kept.
    assert ImageProcessor.from_dict({"image_size": 384, "image_std": [0, 0, 0], "do_normalize": False}).image_std == \
        (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"^image_std \[0.5, 0.0, 0.5\] with do_normalize true"):
        ImageProcessor(image_size=64, image_std=(0.5, 0.0, 0.5), normalize=True)  # built in code: the same check


def test_normalising_uses_each_channels_own_mean_and_std():
    # (the released statistics are all 0.5 or normalise in the tower, where a channel swap would not show)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    got = ImageProcessor(image_size=32, image_mean=CLIP_MEAN, image_std=CLIP_STD, normalize=True)(img)
    expected = (np.asarray(img, dtype=np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # (H, W, 3)
    assert torch.allclose(got, torch.from_numpy(expected).float().permute(2, 0, 1), atol=1e-5)


def make_mode(mode: str) -> Image.Image:
    """A 40x30 image in the given mode whose left half is dark and right half bright."""
    a = np.zeros((30, 40), dtype=np.float64)
    a[:, 20:] = 1.0
    if mode in ("I;16", "I"):
        img = Image.fromarray((a * 65535).astype(np.uint16 if mode == "I;16" else np.int32))  # I;16 or I
    elif mode == "F":
        img = Image.fromarray(a.astype(np.float32))  # F
    else:
        img = Image.fromarray((a * 255).astype(np.uint8), mode="L").convert(mode)
    return img


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F"])
def test_every_mode_becomes_rgb_with_its_brightness_kept(mode):
    img = make_mode(mode)
    assert img.mode == mode
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    a = np.asarray(rgb).astype(int)
    assert a[:, :20].max() <= 10, mode  # dark stays dark
    assert a[:, 20:].min() >= 245, mode  # bright stays bright (16-bit is rescaled, not clipped)
    # a PIL image given to the processor goes through the same conversion as a file (not a bare convert("RGB"),
    # which turns 16-bit grey white)
    x = ImageProcessor(image_size=40)(img)  # (3, 40, 40): rows 5-34 hold the image, padded above and below
    assert x.shape == (3, 40, 40) and x[:, 10:30, :15].max() <= 10 / 255 and x[:, 10:30, 25:].min() >= 245 / 255


def test_sixteen_bit_mid_grey_is_mid_grey():
    img = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # I;16
    assert abs(int(np.asarray(to_rgb(img))[0, 0, 0]) - 128) <= 1
    # rounded to the nearest 8-bit value, not cut down: 16-bit 65535 * 100.6 / 255 is 8-bit 100.6, so 101; and the
    # big-endian file mode is rescaled the same way
    value = round(65535 * 100.6 / 255)
    assert np.asarray(to_rgb(Image.fromarray(np.full((8, 8), value, dtype=np.uint16))))[0, 0, 0] == 101
    big_endian = Image.frombytes("I;16B", (8, 8), np.full((8, 8), value, dtype=">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[0, 0, 0] == 101
    # values below 0 (a signed 32-bit or float image) are black, not wrapped round to bright
    assert np.asarray(to_rgb(Image.fromarray(np.full((8, 8), -100, dtype=np.int32))))[0, 0, 0] == 0
    # A 32-bit image whose values stay within 0-255 holds 8-bit values: white stays white. One holding 16-bit values
    # (mid-grey 32768) is rescaled as 16 bits, and a 16-bit file stays 16-bit however dark (200 of 65535: black).
    assert np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 255, dtype=np.int32))))[0, 0, 0] == 255
    assert abs(int(np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 32768, dtype=np.int32))))[0, 0, 0]) - 128) <= 1
    dark = Image.frombytes("I;16B", (8, 8), np.full((8, 8), 200, dtype=">u2").tobytes())
    assert np.asarray(to_rgb(dark))[0, 0, 0] <= 1
    # Every 16-bit value goes to the nearest 8-bit one (scaled in float32, for memory: float64 rounds the same)
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    nearest = np.floor(every.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(every)))[..., 0], nearest)


def test_a_float_image_with_nan_or_inf_is_refused_not_rescaled_black(tmp_path):
    a = np.full((8, 8), 0.5, dtype=np.float32)
    assert abs(int(np.asarray(to_rgb(Image.fromarray(a, mode="F")))[0, 0, 0]) - 128) <= 1  # in [0, 1]: mid-grey
    for value in (np.nan, np.inf):  # one such pixel made the largest value NaN (all black) or inf (all white)
        a[0, 0] = value
        Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
        with pytest.raises(ValueError, match=r"cannot read image .*f\.tif.*: 1 of its 64 pixels are NaN or infinite"):
            load_image(tmp_path / "f.tif")
        with pytest.raises(ValueError, match="1 of its 64 pixels are NaN or infinite .*; expected finite values"):
            ImageProcessor(image_size=16)(Image.fromarray(a, mode="F"))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    shown = load_image(path)
    assert shown.size == (20, 40)  # portrait once rotated
    top, bottom = np.asarray(shown)[2, 10], np.asarray(shown)[37, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_pillows_warnings_stay_quiet_and_the_picture_is_the_official_convert(tmp_path):
    # A palette PNG whose transparency table has several entries (pngquant's, most web PNG-8s): Pillow warns that it
    # "should be converted to RGBA images" as it drops the alpha, which is what the official convert("RGB") gives.
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    img.paste(1, (0, 0, 4, 8))
    img.paste(2, (4, 0, 8, 8))
    img.save(tmp_path / "pal.png", transparency=bytes([0, 128, 255]))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        shown = load_image(tmp_path / "pal.png")
        with Image.open(tmp_path / "pal.png") as raw:
            official = raw.convert("RGB")  # (Pillow's warning, here, shows the file is one that gets it)
    assert [str(w.message) for w in said] == [str(said[-1].message)] and "RGBA" in str(said[-1].message)
    assert np.array_equal(np.asarray(shown), np.asarray(official))


def png_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_files_get_an_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=f"{missing} does not exist"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"cannot read image {corrupt}"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes()[:2000])
    with pytest.raises(ValueError, match=f"cannot read image {truncated}"):
        load_image(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match=f"cannot read image {text}"):
        ImageProcessor(image_size=32)(text)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read image .*empty.png: the file is empty \(0 bytes\)$"):
        load_image(tmp_path / "empty.png")
    # What a user is likely to give, named: a phone's HEIC photo, an SVG, a folder, a web address
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (tmp_path / "logo.svg").write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    (tmp_path / "bare.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"></svg>')  # without the XML prolog
    (tmp_path / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1" + bytes(64))
    for path, why in [(tmp_path / "photo.heic", r"a HEIC/HEIF photo \(as iPhones take\), a format Pillow does not "
                                                "read; convert it to PNG or JPEG"),
                      (tmp_path / "logo.svg", "an SVG drawing, a format Pillow does not read"),
                      (tmp_path / "bare.svg", "an SVG drawing, a format Pillow does not read"),
                      (tmp_path / "photo.avif", "an AVIF image"),
                      (tmp_path, f"image {tmp_path} is a folder: expected an image file"),
                      ("https://example.org/cat.png", r"does not exist \(a web address: download the image first\)"),
                      ("http://example.org/cat.png", r"does not exist \(a web address: download the image first\)")]:
        with pytest.raises(ValueError, match=why):
            load_image(path)
    # An image given open, then closed before it was read (Pillow's own error named no image)
    Image.new("RGB", (8, 8)).save(tmp_path / "closed.png")
    with Image.open(tmp_path / "closed.png") as closed:
        pass
    loaded, made = Image.open(tmp_path / "closed.png"), Image.new("RGB", (8, 8))
    loaded.load()
    loaded.close()  # (close() drops the pixels even once read)
    made.close()
    for image, name in [(closed, r" \(.*closed.png\)"), (loaded, r" \(.*closed.png\)"), (made, "")]:
        with pytest.raises(ValueError, match=rf"the PIL image given{name} was closed \(Image.close\(\), or the end of "
                                             r"a `with Image.open\(...\)` block\): its pixels can no longer be read"):
            ImageProcessor(image_size=32)(image)


def test_a_missing_name_that_looks_like_one_there_says_why(tmp_path):
    """Names that print like a file in the folder but are not its name, and the system's own errors said as such."""
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(ValueError, match=r"cat.png  does not exist \(its name begins or ends with white space: "
                                         r"'cat.png '\)"):
        load_image(str(tmp_path / "cat.png") + " ")
    with pytest.raises(ValueError, match=r"dog.png  does not exist$"):  # no dog.png either: nothing to hint at
        load_image(str(tmp_path / "dog.png") + " ")
    (tmp_path / "my pets").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "my pets" / "a cat.png")
    with pytest.raises(ValueError, match=re.escape(f"does not exist as written, but {tmp_path}/my pets/a cat.png does: "
                                                   "write the spaces without a backslash")):  # (a shell's escapes)
        load_image(f"{tmp_path}/my\\ pets/a\\ cat.png")
    with pytest.raises(ValueError, match=re.escape(f"does not exist as written, but {tmp_path}/my pets/a cat.png does: "
                                                   "write / between folders, not \\")):  # (a Windows path)
        load_image(f"{tmp_path}\\my pets\\a cat.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "\u00fcber.png")  # u-umlaut as one character (NFC), as Linux writes it
    decomposed = str(tmp_path / "u\u0308ber.png")  # u and a combining mark (NFD), as a macOS list may name it
    with pytest.raises(ValueError, match=re.escape(f"does not exist as written, but the same name in another Unicode "
                                                   f"form (NFC) does: {ascii(str(tmp_path / chr(252)))[:-1]}")):
        load_image(decomposed)
    Image.new("RGB", (8, 8)).save(decomposed.replace("ber.png", "ber2.png"))  # and the other way round (macOS copies)
    with pytest.raises(ValueError, match=r"the same name in another Unicode form \(NFD\) does"):
        load_image(tmp_path / "\u00fcber2.png")
    with pytest.raises(ValueError, match=r"cannot read image .*: File name too long$"):  # no "corrupt file?" hint
        load_image(tmp_path / ("x" * 300 + ".png"))


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes((200, 100)))
    with pytest.raises(ValueError, match=r"big.png is 200x100 = 20,000 pixels, over the limit of 10,000"):
        load_image(big, max_pixels=10_000)
    assert load_image(big).size == (200, 100)
    assert load_image(big, max_pixels=20_000).size == (200, 100)  # the limit itself is allowed
    for mode in ("RGB", "I", "F"):  # (the deep modes are rescaled first, by their largest value: there is none)
        with pytest.raises(ValueError, match="the image is 0x10 pixels: there is nothing in it to look at"):
            ImageProcessor(image_size=64)(Image.new(mode, (0, 10)))
    head_only = tmp_path / "head_only.png"  # the header says 200x100; the pixel data is cut off
    head_only.write_bytes(png_bytes((200, 100))[:60])
    with pytest.raises(ValueError, match="over the limit"):  # said from the header: decoding would fail otherwise
        load_image(head_only, max_pixels=10_000)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(head_only)
    # Headers past PIL's limits, which it checks when opening, before ours: over its warning level (89 MP) no warning
    # is printed (the limit is ours), and over its error level the error says what to do.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def header_only(side: int):  # a side x side 8-bit RGB PNG, says the header; no pixel data follows
        path = tmp_path / f"{side}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) +
                         chunk(b"IDAT", b""))
        return path

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be an exception
        with pytest.raises(ValueError, match="10000.png is 10000x10000 = 100,000,000 pixels, over the limit of 10,000"):
            load_image(header_only(10_000), max_pixels=10_000)
    with pytest.raises(ValueError, match="20000.png is too large to read .* downscale it first"):
        load_image(header_only(20_000))


def test_running_out_of_memory_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    path = tmp_path / "fine.png"
    path.write_bytes(png_bytes())

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image, "open", no_memory)
    with pytest.raises(MemoryError):  # this machine's limit: the file is not to blame, nor to be skipped as bad
        load_image(path)


def test_a_path_pil_refuses_is_named_too():
    with pytest.raises(ValueError, match=r"cannot read image 'a\\x00b.png': embedded null"):
        load_image("a\x00b.png")


def test_a_file_that_fails_inside_pils_decoder_is_a_value_error(tmp_path):
    """PIL's decoders raise more than OSError: a DDS header with no pixel format gives NotImplementedError."""
    dds = tmp_path / "bad.dds"
    dds.write_bytes(b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 16, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0)
                    + bytes(20) + struct.pack("<I", 0x1000) + bytes(80))
    with pytest.raises(ValueError, match=f"cannot read image {dds}: "):
        load_image(dds)


def test_cached_processor_gives_the_same_tensors_and_keeps_to_its_budget(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(paths[-1])
    proc = ImageProcessor(image_size=64, image_mean=CLIP_MEAN)
    cached = CachedProcessor(proc, max_bytes=2 * 64 * 64 * 3)  # room for two uint8 canvases
    first = [cached(p) for p in paths]
    assert all(torch.equal(t, proc(p)) for t, p in zip(first, paths))
    for p in paths[:2]:
        os.remove(p)  # the second pass reads the first two from the cache, the third from its file again
    assert all(torch.equal(cached(p), t) for p, t in zip(paths, first))
    assert sorted(cached.cache) == paths[:2] and cached.held == 2 * 64 * 64 * 3
    # A DataLoader worker gets a pickled copy; it reads the same pixels and the processor's fields stay reachable.
    copy = pickle.loads(pickle.dumps(cached))
    assert torch.equal(copy(paths[2]), proc(paths[2])) and copy.image_size == 64


def test_cached_processor_at_siglips_size_gives_what_the_model_would_shrink_the_canvas_to(tmp_path):
    cfg = get_config("tiny")
    proc = ImageProcessor.for_config(cfg)
    rng = np.random.default_rng(2)
    paths = []
    for i, size in enumerate([(300, 200), (90, 160)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    small = CachedProcessor(proc, max_bytes=1 << 20, size=cfg.siglip.image_size)
    canvases = torch.stack([proc(p) for p in paths])
    expected = DeepSeekVL(cfg).siglip_input(canvases)  # the hybrid model's own resize, on a batch
    for _ in range(2):  # decoded and shrunk, then from the cache
        got = torch.stack([small(p) for p in paths])
        assert got.shape == (2, 3, 96, 96) and torch.equal(got, expected)
    assert small.held == 2 * 3 * 96 * 96 * 4
