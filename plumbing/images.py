"""
Images in, tensors out, for every source of preference pairs: the toy world drawn in code, the
pixel convention every image follows, decoding of image files, and one resize/crop/flip shared by
the two images of a pair (with SDXL's size and crop conditioning). Images are float32 (3,R,R) in
[-1, 1], the range the SD VAE expects.

The toy world: prompts "a {colour} {shape} on a {background} background", a procedural renderer,
and two procedural styles (winter, sketch) that stand in for InstructPix2Pix edits. Everything is
drawn with numpy from a seed: no files, no downloads. data.py builds the toy data sets from it
(ToyPairs: Style Alignment pairs, docs/method.md#style-alignment; ToyImages: single images for
pretraining a toy base model), plumbing/tiny.py gives its tiny tokenizer one token per toy word, and
plumbing/toy_scorer.py learns to read colour, shape and style.
"""
import io
import re
import struct
import warnings

import numpy as np
import torch
from PIL import Image


# ---------------------------------------------------------------------------------------
# The toy world
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated, mutually distinct hues so "colour" is learnable even at 16x16
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240),
               "gray": (128, 128, 128), "brown": (110, 70, 40)}
STYLES = ("winter", "sketch")
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges without any drawing library
PROMPT_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def toy_prompts(split="train"):
    """The 72 prompts (3 shapes x 6 colours x 4 backgrounds), or the train/test part of them.

    Held-out rule: with indices s (shape), c (colour), b (background) in the orders above, a prompt
    is "test" iff (s + c + b) % 6 == 0. For each of the 3x4 (shape, background) pairs exactly one
    colour satisfies it, so the test split has 12 prompts: every shape 4 times, every background
    3 times, and every colour (s + b takes all values 0..5). Train (60) contains each attribute
    too, so test prompts are unseen *combinations* of seen words: what Style Alignment evaluates ("the
    style for unseen prompts")."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"toy_prompts: split must be 'train', 'test' or 'all', got {split!r}")
    out = []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for b, background in enumerate(BACKGROUNDS):
                is_test = (s + c + b) % 6 == 0
                if split == "all" or is_test == (split == "test"):
                    out.append(f"a {colour} {shape} on a {background} background")
    return out


def render_toy(prompt, resolution, rng):
    """Draw the prompt's shape as uint8 (R,R,3), centre and size jittered by rng."""
    m = PROMPT_RE.match(prompt)
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        raise ValueError(f"render_toy: not a toy prompt: {prompt!r} "
                         f"(expected 'a <colour> <shape> on a <background> background')")
    colour, shape, background = m[1], m[2], m[3]
    R = resolution
    # Half-extent h and centre (in output pixels). The margin keeps the whole shape inside the
    # frame, so a shape never gets clipped into a different-looking one.
    h = rng.uniform(0.25, 0.36) * R
    margin = 0.06 * R
    cx = rng.uniform(h + margin, R - h - margin)
    cy = rng.uniform(h + margin, R - h - margin)
    # Coordinates of the supersampled pixel centres, in output-pixel units.
    g = (np.arange(R * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    x, y = g[None, :] - cx, g[:, None] - cy
    if shape == "circle":
        mask = x**2 + y**2 <= h**2
    elif shape == "square":
        mask = (np.abs(x) <= h) & (np.abs(y) <= h)
    else:  # triangle, apex up: base 2h wide at y=+h, apex at y=-h; |x| shrinks linearly upward
        mask = (y <= h) & (np.abs(x) <= (y + h) / 2)
    # Box filter: the mean of each 4x4 block is the pixel's coverage in [0, 1].
    cover = mask.reshape(R, SUPERSAMPLE, R, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    img = (1 - cover) * np.array(BACKGROUNDS[background]) + cover * np.array(COLOURS[colour])
    return np.round(img).astype(np.uint8)


def apply_style(img, style, rng):
    """Procedural stand-ins for InstructPix2Pix edits (docs/method.md#style-alignment). uint8 HxWx3 in and out."""
    x = img.astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma
    if style == "winter":
        x = 0.5 * x + 0.5 * gray[..., None]                 # desaturate by 50%
        x = 0.75 * x + 0.25 * 255                           # brighten: lift 25% toward white
        x = x * np.array([0.88, 0.96, 1.0]) + np.array([0, 0, 20])  # cold blue cast
        snow = rng.random(x.shape[:2]) < 0.05               # white speckles on ~5% of pixels
        x[snow] = 250
    elif style == "sketch":
        # Pencil sketch: dark strokes where the colour changes, a faint tone for filled
        # regions, on light paper with a little grain. Grayscale. The edge strength is the RGB
        # gradient norm (central differences), not the luma gradient: red on gray has nearly
        # equal luma and would otherwise lose its outline.
        xp = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        gx, gy = xp[1:-1, 2:] - xp[1:-1, :-2], xp[2:, 1:-1] - xp[:-2, 1:-1]
        edge = np.sqrt((gx**2 + gy**2).sum(axis=-1))
        paper = 242 + rng.normal(0, 3, gray.shape)
        x = paper - np.clip(1.2 * edge, 0, 190) - 0.12 * (255 - gray)
        x = np.repeat(x[..., None], 3, axis=2)
    else:
        raise ValueError(f"apply_style: unknown style {style!r}; expected one of {STYLES}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Pixels: images are float32 (3,H,W) in [-1, 1], the range the SD VAE (and the pixel-space
# tiny preset) expects; data.py converts every source's images with image_to_tensor.
def image_to_tensor(img):
    """PIL image or uint8 HxWx3 array -> float32 (3,H,W) tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def tensor_to_uint8(t):
    """Inverse of image_to_tensor: (3,H,W) -> uint8 HxWx3, or (B,3,H,W) -> uint8 BxHxWx3.
    Clamps first because model samples overshoot [-1, 1] slightly."""
    t = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).numpy()


# ---------------------------------------------------------------------------------------
# CLIP's input and output, as E5's CLIP (model.clip_features) and the reward models (plumbing/rewards.py) use them
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_output(out):
    # transformers < 5 returns the projected features; 5.x wraps them in .pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


def clip_pixels(clip, images):
    """(N,3,H,W) images in [-1, 1] -> CLIP's pixel_values: resized to its input size (bicubic,
    batched, no PIL) and normalised as OpenAI CLIP's processor does, on the model's device."""
    device = next(clip.parameters()).device
    size = clip.config.vision_config.image_size
    x = (images.to(device, torch.float32) + 1) / 2
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(clip.dtype)


# ---------------------------------------------------------------------------------------
# Image pairs from files
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
    size conditioning. Pixel modes: see _to_rgb."""
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


def _decode(im, resolution):
    """An opened (header-only) image -> read_image's answer."""
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

