"""
Images as the project computes with them: the toy world drawn in code, the pixel convention every
image follows (float32 (3,R,R) in [-1, 1], the range the SD VAE expects: image_to_tensor,
tensor_to_uint8), and CLIP's input and output (clip_pixels, clip_output). Image files and pairs
of them are plumbing/image_files.py's.

The toy world: prompts "a {colour} {shape} on a {background} background", a procedural renderer,
and two procedural styles (winter, sketch) that stand in for InstructPix2Pix edits. Everything is
drawn with numpy from a seed: no files, no downloads. data.py builds the toy data sets from it
(ToyPairs: Style Alignment pairs, docs/method.md#style-alignment; ToyImages: single images for
pretraining a toy base model), plumbing/tiny.py gives its tiny tokenizer one token per toy word, and
plumbing/toy_scorer.py learns to read colour, shape and style.
"""
import re

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
