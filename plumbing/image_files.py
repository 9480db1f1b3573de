"""
Image files in, training pairs out, for every source of real preference pairs (plumbing/pickapic.py,
data.ManifestPairs): decoding within a pixel budget (read_image, decode_image: any PIL mode to 8-bit
RGB by its real range, hostile files refused in one line), and one resize/crop/flip shared by the
two images of a pair, with SDXL's size and crop conditioning (ImagePairs). Images come out in the
pixel convention of plumbing/images.py: float32 (3,R,R) in [-1, 1].
"""
import io
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image

from plumbing.images import image_to_tensor


class ImagePairs(torch.utils.data.Dataset):
    """What every source of real image pairs shares: resize, one crop and one flip for both
    images of a pair, and the SDXL size/crop conditioning. Subclasses find (prompt, winner,
    loser) and call self.pair_item."""

    def __init__(self, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        # Crop/flip randomness is keyed on the epoch, so each epoch sees new crops. A DataLoader
        # worker holds its own copy of the dataset, so data.stream_batches sends the epoch with
        # every index (data.EpochItems sets it here, in whichever process reads the item).
        self.epoch = 0
        self.skip_counts = {}  # reason -> count, for pairs dropped before training sees them

    def pair_item(self, prompt, win, los, i):
        """Two PIL images (decoded) -> the training item: both resized so the shorter side of
        the winner is `resolution`, cropped by one window, flipped by one decision."""
        R = self.resolution
        # Resize so the shorter side is exactly R. The loser goes to the winner's resized size
        # even if its own aspect differs, so one crop window fits both.
        w0, h0 = win.size
        scale = R / min(w0, h0)
        size = (R, max(R, round(h0 * scale))) if w0 <= h0 else (max(R, round(w0 * scale)), R)
        # (h, w) before any resize; read_image records it when it shrank a big image on decode
        (ow, oh), (lw, lh) = win.info.get("original_size", win.size), los.info.get("original_size", los.size)
        original_w, original_l = (oh, ow), (lh, lw)
        win = win if win.size == size else win.resize(size, Image.BICUBIC)
        los = los if los.size == size else los.resize(size, Image.BICUBIC)
        # One crop corner and one flip decision for BOTH images: a pair cropped differently
        # would differ in content as well as in quality, and the loss would learn the crop.
        # Draw all three numbers always, so the flip decision doesn't depend on random_crop.
        rng = np.random.default_rng([self.seed, self.epoch, i])
        W, H = size
        top, left, flip = rng.integers(0, H - R + 1), rng.integers(0, W - R + 1), rng.random() < 0.5
        if not self.random_crop:
            top, left = (H - R) // 2, (W - R) // 2  # centre (floor: biased to top-left by <1 px)
        box = (int(left), int(top), int(left) + R, int(top) + R)
        out = []
        for im in (win, los):
            im = im.crop(box)
            if self.random_flip and flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(image_to_tensor(im))
        # crop_top_left is the crop window in the resized, unflipped image (SDXL add_time_ids);
        # the original sizes are (height, width) before any resize, as SDXL conditions on them.
        return {"prompt": prompt, "winner": out[0], "loser": out[1], "original_size_w": original_w,
                "original_size_l": original_l, "crop_top_left": (int(top), int(left)), "index": i}


MAX_PIXELS = 40_000_000  # pixels decoded per image (~120 MB as RGB); larger ones are refused
MAX_ASPECT = 20  # longer side / shorter side: a 1x3000 strip resized to 512 wide is 768 MP
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")  # modes box-reduced as they are
# What Pillow raises on broken or hostile files besides OSError (its plugins are not uniform).
_BROKEN = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError)


def read_image(source, resolution=None):
    """A path or encoded bytes -> (RGB PIL image, None), or (None, (kind, detail)) when the
    image is refused: kind is "corrupt image", "image too large" or "extreme aspect ratio"
    (the skip reason to count), detail a short text for the warning.

    Budget, checked on the header before any pixel is decoded: an aspect ratio over
    MAX_ASPECT:1 is refused; so is an image over MAX_PIXELS (Pillow's decompression-bomb
    guard stays on above that). With `resolution` R (the training size) big images are shrunk
    cheaply: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Image.draft: a low-pass in the DCT,
    counted against the budget at that scale) to a shorter side in [R, 2R) where the scales
    allow; anything else is box-reduced by an integer factor (Image.reduce) to a shorter side
    in [2R, 4R), leaving at least 2x to the bicubic resize so the box filter does not alias
    (Image.thumbnail's reducing_gap=2). Images under 2R are decoded untouched.
    The image's size before any shrinking is in .info["original_size"] (w, h), for SDXL's
    size conditioning. A JPEG's EXIF orientation is applied (the image as a viewer shows it).
    Pixel modes: see _to_rgb."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our budget is lower
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                return _decode(im, resolution)
    except Image.DecompressionBombError as err:
        return None, ("image too large", str(err).split(" could be")[0].rstrip(","))
    except _BROKEN as err:
        return None, ("corrupt image", (str(err).splitlines() or [type(err).__name__])[0][:160])


def decode_image(source, resolution=None):
    """A path or JPEG/PNG/... bytes -> 8-bit RGB PIL image, or None when it is refused
    (corrupt, too large, extreme aspect ratio: read_image says which)."""
    return read_image(source, resolution)[0]


# EXIF orientation (how the camera was held) -> the transpose that shows the image upright, as
# viewers and PIL.ImageOps.exif_transpose do; 1 (or none): as stored.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _decode(im, resolution):
    """An opened (header-only) image -> read_image's answer, upright (EXIF orientation applied)."""
    upright = _UPRIGHT.get(im.getexif().get(0x0112))  # (a phone's JPEG: stored sideways, shown upright)
    w, h = im.size
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        return None, ("extreme aspect ratio", f"{w}x{h}, more than {MAX_ASPECT}:1")
    if resolution:
        im.draft(None, (resolution, resolution))  # JPEG only (others ignore it); changes im.size
    if im.size[0] * im.size[1] > MAX_PIXELS:
        return None, ("image too large", f"{w}x{h} = {w * h / 1e6:.1f} MP, over the "
                                         f"{MAX_PIXELS / 1e6:g} MP budget")
    factor = min(im.size) // (2 * resolution) if resolution else 1
    if factor > 1:
        # Box-averaging is meaningful for these modes only (not palette indices, not a
        # transparent colour key); Image.reduce refuses 1, P and I;16 anyway.
        if im.mode not in _REDUCIBLE or "transparency" in im.info:
            im = _to_rgb(im)
        im = im.reduce(factor)  # (RGBA/LA: Pillow premultiplies alpha for this)
    out = _to_rgb(im)
    if upright is not None:
        out = out.transpose(upright)
        w, h = (h, w) if upright in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_270,
                                     Image.Transpose.ROTATE_90) else (w, h)
    out.info["original_size"] = (w, h)
    return out, None


def _to_rgb(im):
    """Any PIL mode -> a new 8-bit RGB image (forces the decode). Each mode by its real range:
      I;16*  16-bit (PNG, TIFF): value / 257
      I      32-bit ints (TIFF; 16-bit PNGs on old Pillow): max <= 255 -> taken as 8-bit values;
             max <= 65535 -> 16-bit, / 257; larger -> scaled so the image's own max is 255
      F      floats: max <= 1 -> [0, 1] (x 255), else [0, 255]; NaN -> 0
      (all rounded, clipped to [0, 255], grey -> RGB)
      RGBA, LA, PA, and P/L/RGB with a transparent colour: alpha composited on white,
             round(c·a + 255·(1 - a)) with a = alpha / 255 (a transparent pixel is white, not
             whatever colour it hides)
      1, L, P, CMYK, YCbCr, ... (no transparency): Pillow's convert("RGB")."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        top = float(a.max()) if a.size else 0.0
        if mode == "F":
            scale = 255.0 if top <= 1 else 1.0
        elif mode.startswith("I;16"):
            scale = 1 / 257  # 65535 -> 255 exactly
        else:
            scale = 1.0 if top <= 255 else 1 / 257 if top <= 65535 else 255 / top
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def is_file(path):
    """Whether PATH is a regular file; False also for a path the file system cannot look up (a
    name over 255 bytes, a NUL byte, ...), which pathlib's is_file raises on."""
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False
