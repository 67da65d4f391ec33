"""
The image processor: a file or PIL image -> the square (3, S, S) canvas the vision towers read. It reproduces the
released `VLMImageProcessor` (official image_processing_vlm.py; facts sheet section 8):

    any PIL mode -> RGB                       (EXIF orientation applied first: see to_rgb for the two deviations)
    resize: long side -> S, aspect kept      target (max(int(h/M*S), 14), max(int(w/M*S), 14)), M = max(w, h),
                                              PIL bicubic (what torchvision's resize does on a PIL image)
    pad to S x S, centred, with the mean colour   offset (S - short) // 2; colour int(255 * mean) per channel
                                              (normalised with that mean, about 0: padding adds little signal; the
                                              7B's SigLIP branch, with other statistics, sees a slightly dark border,
                                              as in the official code)
    HWC uint8 -> CHW float in [0, 1]
    normalise (x - mean) / std                only where the model does not normalise inside its towers

S and the statistics depend on the model: the released 7B and our hybrid presets use a 1024 (or scaled-down) canvas,
padded with the CLIP mean (122, 116, 104) and left unnormalised, because each tower normalises its own branch; the
released 1.3B uses 384, mean = std = 0.5, and normalises here. `ImageProcessor.for_config` picks these from a config.

Bad files get a ValueError naming the file: missing, corrupt, truncated, not an image, or larger than the pixel limit
(decompression bombs: a tiny PNG can claim billions of pixels, so the size is checked before any pixel is decoded).
That file-reading half (load_image, to_rgb) is the last section of this file; the processor comes first.
"""

import math
import os
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from nanovl.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VLConfig

MIN_SIZE = 14  # the official processor never resizes a side below 14 pixels


@dataclass
class ImageProcessor:
    """The official VLMImageProcessor, as a callable: an image (a path or a PIL image) -> (3, S, S) float32 tensor.
    Made for a model by for_config(cfg), or from a released folder's preprocessor_config.json by from_dict, which
    fills what the file leaves out with the official class's defaults. The field defaults here are neither: a
    1024-pixel canvas padded with SigLIP's mean grey, unnormalised, for building one by hand."""
    image_size: int = 1024
    image_mean: Tuple[float, float, float] = SIGLIP_MEAN  # gives the pad colour, and the normalisation if on
    image_std: Tuple[float, float, float] = SIGLIP_STD
    normalize: bool = False

    def __post_init__(self):
        # The canvas's side: an integer the official processor can resize to (a size of 0 gave empty tensors, and a
        # negative one failed inside PIL; a bool or a float such as 384.9 passed int() and was silently truncated).
        if type(self.image_size) is not int or self.image_size < MIN_SIZE:
            raise ValueError(f"image_size must be a whole number of pixels, at least {MIN_SIZE}; got "
                             f"{self.image_size!r}")
        if type(self.normalize) is not bool:  # ("false", a string, would normalise)
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        for name in ("image_mean", "image_std"):  # (the pad colour is made of the mean: a bad one failed inside PIL)
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3 and
                    all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"{name} must be 3 numbers, one per colour channel; got {value!r}")
        # Normalising divides the pixels by image_std: a 0 there makes inf or NaN pixels, which the model then reports
        # as NaN in the image, far from the statistic that made them; a negative one turns the image's values over.
        if self.normalize:
            std = [v for v in self.image_std if not 0 < v < math.inf]  # (NaN fails both comparisons)
            if std:
                raise ValueError(f"image_std {list(self.image_std)} with do_normalize true: the pixels are divided by "
                                 f"it, so each value must be a positive, finite number; got {std[0]}")
            mean = [v for v in self.image_mean if not math.isfinite(v)]
            if mean:
                raise ValueError(f"image_mean {list(self.image_mean)} with do_normalize true: the pixels are centred "
                                 f"on it, so each value must be a finite number; got {mean[0]}")

    @staticmethod
    def for_config(cfg: VLConfig) -> "ImageProcessor":
        """The processor a model expects: its canvas size; normalise here only if the towers do not."""
        if cfg.hybrid:  # towers normalise; the canvas is padded with the high-resolution branch's mean (7B: CLIP)
            return ImageProcessor(cfg.image_size, cfg.sam.pixel_mean, cfg.sam.pixel_std, normalize=False)
        if cfg.siglip.pixel_mean is not None:  # SigLIP normalises inside its tower
            return ImageProcessor(cfg.image_size, cfg.siglip.pixel_mean, cfg.siglip.pixel_std, normalize=False)
        return ImageProcessor(cfg.image_size, SIGLIP_MEAN, SIGLIP_STD, normalize=True)  # released 1.3B

    # preprocessor_config.json, the file a released model folder carries (VLMImageProcessor's fields).
    @staticmethod
    def from_dict(d: dict) -> "ImageProcessor":
        if not isinstance(d, dict):
            raise ValueError(f"preprocessor_config.json: expected an object of settings, got {type(d).__name__}")
        # A field the file leaves out takes VLMImageProcessor's class default (CLIP's statistics, normalising on),
        # as the official code would. A mean given as null pads with 127s, as official; there is then nothing to
        # normalise with, so only do_normalize false goes with it (the 0.5 below gives the 127s, and divides nothing).
        if d.get("do_normalize", True) and any(k in d and d[k] is None for k in ("image_mean", "image_std")):
            raise ValueError(f"preprocessor_config.json: image_mean {d.get('image_mean')} and image_std "
                             f"{d.get('image_std')} with do_normalize true: normalising needs both")
        try:
            mean = tuple(float(m) for m in (CLIP_MEAN if "image_mean" not in d else d["image_mean"] or SIGLIP_MEAN))
            std = tuple(float(s) for s in (CLIP_STD if "image_std" not in d else d["image_std"] or SIGLIP_STD))
            if not isinstance(d.get("do_normalize", True), bool):  # ("false", a string, would read as true)
                raise ValueError(f"do_normalize {d['do_normalize']!r} is not true or false")
            size = d["image_size"]
            rescale = float(d.get("rescale_factor", 1 / 255))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"preprocessor_config.json needs image_size (int), image_mean and image_std (3 numbers "
                             f"each), do_normalize (true or false) and rescale_factor (a number); got {d!r} ({e})"
                             ) from None
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocessor_config.json: image_mean and image_std need 3 values, got {mean}, {std}")
        if d.get("min_size", MIN_SIZE) != MIN_SIZE or abs(rescale - 1 / 255) > 1e-12:
            raise ValueError(f"preprocessor_config.json: min_size {d.get('min_size', MIN_SIZE)} and rescale_factor "
                             f"{rescale} are not supported; nanovl uses {MIN_SIZE} and 1/255")
        try:
            return ImageProcessor(size, mean, std, d.get("do_normalize", True))
        except ValueError as e:  # (a size or a statistic it cannot work with)
            raise ValueError(f"preprocessor_config.json: {e}") from None

    def to_dict(self) -> dict:
        return {"image_processor_type": "VLMImageProcessor", "image_size": self.image_size, "min_size": MIN_SIZE,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "rescale_factor": 1 / 255,
                "do_normalize": self.normalize}

    @property
    def pad_color(self) -> Tuple[int, int, int]:
        return tuple(int(255 * m) for m in self.image_mean)

    def canvas(self, img: Image.Image, resample=Image.Resampling.BICUBIC, fill=None) -> Image.Image:
        """Resize the long side to image_size (bicubic) and pad to a centred square with the mean colour.

        (Stage 0 puts label maps through the same geometry with resample=NEAREST and fill=0.)"""
        S = self.image_size
        w, h = img.size
        M = max(w, h)
        new_w, new_h = max(int(w / M * S), MIN_SIZE), max(int(h / M * S), MIN_SIZE)
        img = img.resize((new_w, new_h), resample)
        square = Image.new(img.mode, (S, S), self.pad_color if fill is None else fill)
        square.paste(img, ((S - new_w) // 2, (S - new_h) // 2))  # expand2square: centred on the short axis
        return square

    def pixels(self, image: Union[Image.Image, str, os.PathLike]) -> np.ndarray:
        """A PIL image or a path -> the canvas as an (S, S, 3) uint8 array (before any float conversion)."""
        if isinstance(image, Image.Image):
            try:  # (a closed image: Pillow's error names no image, and says nothing of what to do)
                image.load()
            except (ValueError, AssertionError, AttributeError) as e:
                # Image.close() leaves "Operation on closed image"; the end of a `with Image.open(...)` block, an
                # image not yet read with no file to read it from (Pillow asserts its file is there; under python -O,
                # it fails reaching for it)
                if "closed image" not in str(e) and getattr(image, "fp", True) is not None:
                    raise
                name = f" ({image.filename})" if getattr(image, "filename", "") else ""
                raise ValueError(f"the PIL image given{name} was closed (Image.close(), or the end of a `with "
                                 "Image.open(...)` block): its pixels can no longer be read. Pass it while it is "
                                 "open, a copy made before closing it (image.copy()), or its path") from None
            img = to_rgb(image)
        elif isinstance(image, (str, os.PathLike)):
            img = load_image(image)
        else:
            raise ValueError(f"expected an image as a PIL image or a path, got {type(image).__name__}")
        if min(img.size) < 1:
            raise ValueError(f"the image is {img.size[0]}x{img.size[1]} pixels: there is nothing in it to look at")
        return np.asarray(self.canvas(img))

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 canvas -> (3, S, S) float32 tensor, rescaled (and normalised if this processor does)."""
        a = pixels.astype(np.float64) * (1 / 255)  # HF rescales in float64
        x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1).contiguous()  # (3, S, S) in [0, 1]
        if self.normalize:
            x = (x - torch.tensor(self.image_mean).view(3, 1, 1)) / torch.tensor(self.image_std).view(3, 1, 1)
        return x

    def __call__(self, image: Union[Image.Image, str, os.PathLike]) -> torch.Tensor:
        """A PIL image or a path -> (3, S, S) float32 tensor."""
        return self.to_tensor(self.pixels(image))


def low_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, S, S) canvases -> (N, 3, size, size): the hybrid tower's input to SigLIP, made from the same canvas as
    SAM's by torchvision's Resize(size, antialias=True) in the official code, i.e. bilinear with antialiasing."""
    # torchvision's tensor resize computes in fp32 whatever it is given and rounds the result back (its
    # _cast_squeeze_in), so a bf16 model gets the official pixels only this way: a GPU's bf16 kernel keeps its weights
    # and sums in bf16, which moves a fifth of the pixels by up to a grey level.
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).to(images.dtype)


class CachedProcessor:
    """An ImageProcessor that keeps the canvases of the image files it has read, as uint8 (a quarter of the float
    tensor), until max_bytes are held; after that, new files are processed as usual and not kept.

    Training reads every image many times: stage 0 of the tiny default reads each of its 2000 captioned images about
    twenty times. Decoding and resizing them again each time kept a CPU core busy that training needed (on 2 cores,
    0.15 s of image work beside 0.32 s of compute per step). A cached image gives the same tensor, bit for bit. The
    cache lives in the process that reads the data (the DataLoader worker).

    With `size`, the processor gives (and keeps) each image at size x size, through low_resolution: what SigLIP
    reads in the hybrid model. Stage 0's contrastive pairs only ever feed SigLIP, so the worker makes them small
    once, instead of sending the full canvas every step for the model to shrink again (for the tiny preset, 96 x 96
    floats instead of a 256 x 256 canvas: half the memory of the uint8 canvas, a seventh of its float tensor)."""

    def __init__(self, processor: ImageProcessor, max_bytes: int, size: Optional[int] = None):
        self.processor, self.max_bytes, self.size = processor, max_bytes, size
        self.cache, self.held = {}, 0

    def __getattr__(self, name):  # image_size, canvas, ...: the wrapped processor's
        if name == "processor":
            raise AttributeError(name)  # (unpickling looks attributes up before __init__ has run)
        return getattr(self.processor, name)

    def __call__(self, path: Union[str, os.PathLike]) -> torch.Tensor:
        kept = self.cache.get(path)
        if kept is None:
            kept = self.processor.pixels(path)  # uint8 canvas
            if self.size is not None:
                kept = low_resolution(self.processor.to_tensor(kept)[None], self.size)[0]
            if self.held + kept.nbytes <= self.max_bytes:
                self.cache[path] = kept
                self.held += kept.nbytes
        return kept if self.size is not None else self.processor.to_tensor(kept)


# ---------------------------------------------------------------------------------------------------------------------
# Reading image files: a clear ValueError for whatever a user may pass (a missing path, a corrupt or truncated
# file, a format PIL cannot read, a decompression bomb), and any PIL mode brought to RGB.

# 179 megapixels, where PIL itself refuses a file (2 x Image.MAX_IMAGE_PIXELS): a 108 MP phone photo loads (0.3 GB
# decoded), and nothing near what would exhaust memory does.
MAX_PIXELS = 2 * 89_478_485


class TooLarge(ValueError):
    """An image over the pixel limit (told apart from the ValueErrors PIL raises, which load_image rewords)."""


def load_image(path: Union[str, os.PathLike], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later) and return it as an RGB PIL image."""
    if not isinstance(path, (str, os.PathLike)):  # (else said as a corrupt file, from the error PIL raised)
        raise ValueError(f"expected the image's path, got {type(path).__name__}" + (
            " (for an image already open, ImageProcessor takes it as it is)" if isinstance(path, Image.Image) else ""))
    if type(max_pixels) is not int or max_pixels < 1:
        raise ValueError(f"max_pixels must be a whole number of pixels, at least 1; got {max_pixels!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, checked below
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise TooLarge(f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                               "downscale it first")
            img.load()  # decode now: corrupt or truncated data raises here
            return to_rgb(img)
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist{missing_hint(str(path))}") from None
    except IsADirectoryError:
        raise ValueError(f"image {path} is a folder: expected an image file") from None
    except Image.DecompressionBombError as e:  # over PIL's own limit, which it checks before ours
        raise ValueError(f"image {path} is too large to read ({e}); downscale it first") from None
    except TooLarge:
        raise
    except ValueError as e:  # PIL's: a NUL in the path, a bad header
        raise ValueError(f"cannot read image {path!r}: {e}") from None
    except Image.UnidentifiedImageError as e:  # not a format this Pillow reads: say which, when the bytes tell
        if os.path.isfile(path) and os.path.getsize(path) == 0:  # (a download or a copy that failed)
            raise ValueError(f"cannot read image {path}: the file is empty (0 bytes)") from None
        kind = unread_format(path)
        raise ValueError(f"cannot read image {path}: " + (f"{kind}, a format Pillow does not read; convert it to PNG "
                                                          "or JPEG" if kind else f"{e} (is it a corrupt, truncated "
                                                          "or non-image file?)")) from None
    except OSError as e:
        if e.errno is not None:  # the system's (no permission, a name too long): nothing to say of the file's bytes
            raise ValueError(f"cannot read image {path}: {e.strerror}") from None
        raise ValueError(f"cannot read image {path}: {e} (is it a corrupt, truncated or non-image file?)") from None
    except SyntaxError as e:
        raise ValueError(f"cannot read image {path}: {e} (is it a corrupt, truncated or non-image file?)") from None
    except MemoryError:
        raise  # this machine's limit, not the file's fault
    except Exception as e:  # PIL's decoders fail in other ways too (a damaged DDS header: NotImplementedError)
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e} (is it a corrupt file?)") from None


def missing_hint(path: str) -> str:
    """Why a file that does not exist may look as if it did: a web address, a space at either end of the name, a
    shell's escaped spaces or a Windows path (backslashes are part of a name here), or the name spelt in another
    Unicode form (macOS writes "ü" as u and a combining mark, most other systems as one character: the two print alike
    and are different names)."""
    if path.startswith(("http://", "https://")):
        return " (a web address: download the image first)"
    name = os.path.basename(path)
    if name != name.strip() and os.path.exists(os.path.join(os.path.dirname(path), name.strip())):
        return f" (its name begins or ends with white space: {name!r})"
    unescaped, forward = path.replace("\\ ", " "), path.replace("\\", "/")  # (a terminal's drag and drop: "a\ b.png")
    if unescaped != path and os.path.exists(unescaped):
        return f" as written, but {unescaped} does: write the spaces without a backslash"
    if forward != path and os.path.exists(forward):
        return f" as written, but {forward} does: write / between folders, not \\"
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, path)
        if other != path and os.path.exists(other):
            return f" as written, but the same name in another Unicode form ({form}) does: {ascii(other)}"
    return ""


def unread_format(path) -> str:
    """The name of a common image format Pillow cannot open without a plugin, from the file's first bytes, or ""."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return ""
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis", b"hevc"):
        return "a HEIC/HEIF photo (as iPhones take)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "an AVIF image"
    if b"<svg" in head.lower() or (head.lstrip().startswith(b"<?xml") and b"svg" in head.lower()):
        return "an SVG drawing"
    return ""


def upright_size(img: Image.Image) -> Tuple[int, int]:
    """(width, height) of the picture as to_rgb gives it, read from the header alone: an EXIF orientation of 5 to 8
    (a phone held sideways) turns it a quarter, swapping the two."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # (a damaged EXIF block: the image is taken as stored, as exif_transpose takes it)
        orientation = 1
    return img.size[::-1] if orientation in (5, 6, 7, 8) else img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, with the EXIF orientation applied.

    The official code calls `convert("RGB")` alone, which is right for palette, grey, CMYK, YCbCr and alpha modes
    (alpha is dropped, as it does). We differ from it twice, on purpose:
    - a photo whose EXIF says "rotate to display" (most phone pictures) is turned upright first, as a photo viewer
      shows it; the official code gives the model the sensor's orientation, on its side, so for such a file the
      released model answers differently here than in its own repository. (A picture turned by hand in Pillow,
      transpose or rotate, keeps the file's orientation tag and is turned again here: use ImageOps.exif_transpose,
      which clears the tag, or pass the file's path);
    - 16-bit and 32-bit grey ("I;16", "I", "F") are rescaled to 8 bits first, where convert clips every value above
      255 to white (a float image holding NaN or infinite values, which has no scale, is refused).
    Pillow's warnings are kept quiet here (they would reach the user as two lines of library source): that a palette
    with transparency should become RGBA (converted to RGB the alpha is dropped, as above) and that an EXIF block is
    damaged (its orientation is then unknown, and the image is taken as stored).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # In float32, scaled in place, to keep memory low: a 16-bit PNG of a few hundred KB can hold 12000 x 12000
            # pixels (2.0 GB at peak so, 4.4 GB in float64 with a temporary for each step). Mode F is float32 already,
            # and a 16-bit value scaled to 8 bits lies too far from a rounding boundary for float32 to cross one: all
            # 65,536 give what float64 gave (tested).
            a = np.array(img, dtype=np.float32)
            bad = int(a.size - np.isfinite(a).sum())  # (a float image can hold NaN: its largest value is then NaN,
            if bad:  # which chose the scale below wrongly and turned a picture in [0, 1] black, without a word)
                raise ValueError(f"{bad} of its {a.size} pixels are NaN or infinite (a 32-bit float image); expected "
                                 "finite values")
            top = 65535.0 if img.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
            if img.mode == "F" and a.size and a.max() <= 1.0:
                top = 1.0  # float images are usually in [0, 1]
            a *= 255.0 / top
            a += 0.5
            img = Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8))  # mode L
        return img.convert("RGB")
