"""
Data for Diffusion-RPO: preference pairs (prompt, winner image, loser image), SPEC §1.

Two sources, one item format:
  1. A procedural toy set (no files, deterministic from a seed): coloured shapes on plain
     backgrounds. ToyPairs is the paper's Style Alignment task (SPEC §10): winner = the styled
     render, loser = the plain render of the same geometry. ToyImages gives single images for
     pretraining a toy base model with plain denoising.
  2. A JSONL manifest of real pairs (ManifestPairs), either {"prompt","winner","loser"} or the
     Pick-a-Pic form {"caption","image_0","image_1","label_0"} with ties dropped.

Every dataset returns dicts; collate_pairs stacks them. Images are float32 (3,R,R) in [-1, 1],
the range the SD VAE expects. Randomness is always derived from (seed, [epoch,] index), so an
item can be reproduced on its own and resuming needs no saved RNG state.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Image <-> tensor helpers (also used by sampling / evaluation scripts to save PNGs)


def image_to_tensor(img):
    """PIL image or uint8 HxWx3 array -> float32 (3,H,W) tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def tensor_to_uint8(t):
    """Inverse of image_to_tensor: (3,H,W) -> uint8 HxWx3, or (B,3,H,W) -> uint8 BxHxWx3.
    Clamps first because model samples overshoot [-1, 1] slightly."""
    t = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).numpy()


# ----------------------------------------------------------------------------------------------
# 1. Procedural toy set

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # saturated, mutually distinct hues so "colour" is learnable even at 16x16
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 220, 40), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240),
               "gray": (128, 128, 128), "brown": (110, 70, 40)}
STYLES = ("winter", "sketch")
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges without any drawing library
_PROMPT_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


def toy_prompts(split="train"):
    """The 72 prompts (3 shapes x 6 colours x 4 backgrounds), or the train/test part of them.

    Held-out rule: with indices s (shape), c (colour), b (background) in the orders above, a prompt
    is "test" iff (s + c + b) % 6 == 0. For each of the 3x4 (shape, background) pairs exactly one
    colour satisfies it, so the test split has 12 prompts: every shape 4 times, every background
    3 times, and every colour (s + b takes all values 0..5). Train (60) contains each attribute
    too, so test prompts are unseen *combinations* of seen words: what SPEC §10 evaluates ("the
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
    m = _PROMPT_RE.match(prompt)
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
    """Procedural stand-ins for InstructPix2Pix edits (SPEC §10). uint8 HxWx3 in and out."""
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


class ToyPairs(torch.utils.data.Dataset):
    """Style Alignment pairs: winner = styled render, loser = plain render, same geometry."""

    def __init__(self, num_items=8192, resolution=16, seed=0, style="winter", split="train"):
        if style not in STYLES:
            raise ValueError(f"toy data: unknown style {style!r}; expected one of {STYLES}")
        self.num_items, self.resolution, self.seed = num_items, resolution, seed
        self.style, self.prompts = style, toy_prompts(split)

    def __len__(self):
        return self.num_items

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])  # per-item stream: reproducible on its own
        prompt = self.prompts[rng.integers(len(self.prompts))]
        plain = render_toy(prompt, self.resolution, rng)
        return _toy_item(prompt, apply_style(plain, self.style, rng), plain, self.resolution, i)


class ToyImages(ToyPairs):
    """Single images for pretraining the toy base model. A style_fraction of them are styled
    with the caption left unchanged, so the base model can already produce the style for any
    prompt and the later preference pairs lie inside its distribution: preference training then
    only shifts probability mass, as with a real pretrained model."""

    def __init__(self, num_items=8192, resolution=16, seed=0, style="winter", split="train",
                 style_fraction=1 / 3):
        super().__init__(num_items, resolution, seed, style, split)
        self.style_fraction = style_fraction

    def __getitem__(self, i):
        # Same draws, in the same order, as ToyPairs up to the render: item i shows the same
        # prompt and geometry in both sets for one seed.
        rng = np.random.default_rng([self.seed, i])
        prompt = self.prompts[rng.integers(len(self.prompts))]
        img = render_toy(prompt, self.resolution, rng)
        styled = bool(rng.random() < self.style_fraction)
        if styled:
            img = apply_style(img, self.style, rng)
        item = _toy_item(prompt, img, None, self.resolution, i)
        item["styled"] = styled
        return item


def _toy_item(prompt, winner, loser, R, i):
    # Toy images are generated at the final size: nothing resized or cropped, so SDXL-style
    # size conditioning is (R, R) and crop (0, 0).
    item = {"prompt": prompt, "winner": image_to_tensor(winner), "original_size_w": (R, R),
            "crop_top_left": (0, 0), "index": i}
    if loser is not None:
        item["loser"] = image_to_tensor(loser)
        item["original_size_l"] = (R, R)
    return item


# ----------------------------------------------------------------------------------------------
# 2. Preference pairs from a JSONL manifest

# Skip reason -> words for the one-line warning "skipped N lines <words> (first: file:line ...)".
_SKIP_WORDS = {
    "bad_json": "with unreadable JSON",
    "missing_field": "with a missing or empty field",
    "tie": "that are ties (label_0 == 0.5)",
    "bad_label": "with a label_0 other than 0, 0.5 or 1",
    "missing_image": "with a missing image file",
}


class ManifestPairs(torch.utils.data.Dataset):
    """Pairs listed in a JSONL file. Bad lines are skipped and counted at construction (one
    warning per reason); a corrupt image found while loading becomes a skip marker that
    collate_pairs drops, so one bad file never kills a long run."""

    def __init__(self, path, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        # Crop/flip randomness is keyed on the epoch, so each epoch sees new crops. The training
        # loop sets it; DataLoader workers copy the dataset at each iter() (unless
        # persistent_workers=True), so set it before iterating over the epoch.
        self.epoch = 0
        self.pairs = []  # (prompt, winner_path, loser_path)
        self.skip_counts = {}
        first = {}  # reason -> "file:line detail" of the first occurrence
        root = self.path.parent
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not data
                reason, detail, pair = self._parse(line, root)
                if reason:
                    self.skip_counts[reason] = self.skip_counts.get(reason, 0) + 1
                    first.setdefault(reason, f"{path}:{n}" + (f" {detail!r}" if detail else ""))
                else:
                    self.pairs.append(pair)
        for reason, count in self.skip_counts.items():
            print(f"warning: {path}: skipped {count} lines {_SKIP_WORDS[reason]} "
                  f"(first: {first[reason]})", file=sys.stderr)
        if not self.pairs:
            counts = ", ".join(f"{k}={v}" for k, v in self.skip_counts.items()) or "empty file"
            raise ValueError(f"{path}: no usable preference pairs (skipped: {counts})")

    @staticmethod
    def _parse(line, root):
        """One manifest line -> (skip_reason, detail, None) or (None, None, pair)."""
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return "bad_json", None, None
        if not isinstance(rec, dict):
            return "bad_json", None, None

        def field(name):
            v = rec.get(name)
            return v if isinstance(v, str) and v.strip() else None

        if any(k in rec for k in ("caption", "image_0", "image_1", "label_0")):  # Pick-a-Pic
            prompt, im0, im1, label = (field("caption"), field("image_0"), field("image_1"),
                                       rec.get("label_0"))
            if prompt is None or im0 is None or im1 is None or label is None:
                return "missing_field", None, None
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                return "bad_label", label, None
            if label == 0.5:
                return "tie", None, None
            if label not in (0, 1):
                return "bad_label", label, None
            winner, loser = (im0, im1) if label == 1 else (im1, im0)
        else:
            prompt, winner, loser = field("prompt"), field("winner"), field("loser")
            if prompt is None or winner is None or loser is None:
                return "missing_field", None, None
        paths = []
        for p in (winner, loser):
            full = root / p  # an absolute p wins over root in pathlib's "/"
            if not full.is_file():
                return "missing_image", p, None
            paths.append(full)
        return None, None, (prompt, paths[0], paths[1])

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        prompt, wpath, lpath = self.pairs[i]
        imgs = []
        for p in (wpath, lpath):
            try:
                with Image.open(p) as im:
                    imgs.append(im.convert("RGB"))  # convert() forces the full decode here
            except (OSError, ValueError, Image.DecompressionBombError):
                return {"skip": f"corrupt image {p}", "index": i}
        win, los = imgs
        R = self.resolution
        # Resize so the shorter side is exactly R. The loser goes to the winner's resized size
        # even if its own aspect differs, so one crop window fits both.
        w0, h0 = win.size
        scale = R / min(w0, h0)
        size = (R, max(R, round(h0 * scale))) if w0 <= h0 else (max(R, round(w0 * scale)), R)
        original_w, original_l = (h0, w0), (los.size[1], los.size[0])
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


# ----------------------------------------------------------------------------------------------
# 3. Batching


def collate_pairs(items):
    """Stack item dicts into a batch; drop skip markers and report them in "skipped".
    Fields an item kind lacks (loser, original_size_l for ToyImages) come out as None."""
    kept = [it for it in items if "skip" not in it]
    skipped = [it["skip"] for it in items if "skip" in it]
    batch = dict.fromkeys(("winner", "loser", "original_size_w", "original_size_l",
                           "crop_top_left", "index"))  # all None until filled below
    batch.update(prompt=[it["prompt"] for it in kept], skipped=skipped)
    if not kept:  # the training loop checks batch["winner"] is None and moves on
        return batch
    batch["winner"] = torch.stack([it["winner"] for it in kept])
    if "loser" in kept[0]:
        batch["loser"] = torch.stack([it["loser"] for it in kept])
    for key in ("original_size_w", "original_size_l", "crop_top_left"):
        if key in kept[0]:
            batch[key] = torch.tensor([it[key] for it in kept], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in kept], dtype=torch.long)
    if "styled" in kept[0]:
        batch["styled"] = torch.tensor([it["styled"] for it in kept], dtype=torch.bool)
    return batch


# ----------------------------------------------------------------------------------------------
# 4. One entry point for train.py


def build_dataset(spec, resolution, seed=0, split="train", style="winter", style_fraction=1 / 3,
                  random_crop=False, random_flip=False, num_items=8192):
    """"toy" -> ToyPairs, "toy-base" -> ToyImages, "<path>.jsonl" -> ManifestPairs.
    Arguments that don't apply to the chosen kind are ignored (e.g. split for a manifest)."""
    if spec == "toy":
        return ToyPairs(num_items, resolution, seed, style, split)
    if spec == "toy-base":
        return ToyImages(num_items, resolution, seed, style, split, style_fraction)
    if str(spec).endswith(".jsonl"):
        return ManifestPairs(spec, resolution, seed, random_crop, random_flip)
    raise ValueError(f"build_dataset: unknown data spec {spec!r}; expected 'toy', 'toy-base' "
                     f"or a path to a .jsonl manifest")


# ----------------------------------------------------------------------------------------------
# 5. Multi-modal embeddings for the RPO weights (E5)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out):
    # transformers < 5 returns the projected features; 5.x wraps them in .pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_embeddings(clip, tokenizer, prompts, images, mode="mean"):
    """f(c, x) for each sample, L2-normalised, float32 (B, D).

    E5: f(c, x) = normalize( normalize(CLIP_text(c)) + normalize(CLIP_image(x)) ) ("mean");
    "text" = prompt only (as the LLM RPO), "image" = image only. `images` are (B,3,H,W) in
    [-1, 1]; they are resized to CLIP's input size on the model's device (batched, no PIL).
    `images` may hold k images per prompt, in k blocks ([winners; losers]: k = 2): the text is
    encoded once and repeated, as model.encode_prompts does. Returns (k·B, D).
    """
    repeat = len(images) // len(prompts)
    device = next(clip.parameters()).device
    parts = []
    if mode in ("mean", "text"):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        text = _features(clip.get_text_features(input_ids=ids)).float()
        parts.append(torch.nn.functional.normalize(text, dim=-1).repeat(repeat, 1))
    if mode in ("mean", "image"):
        size = clip.config.vision_config.image_size
        x = (images.to(device, torch.float32) + 1) / 2
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        pixels = ((x - mean) / std).to(clip.dtype)
        parts.append(torch.nn.functional.normalize(_features(clip.get_image_features(pixel_values=pixels)).float(), dim=-1))
    if not parts:
        raise ValueError(f"embed mode must be 'mean', 'text' or 'image', got {mode!r}")
    return torch.nn.functional.normalize(sum(parts), dim=-1)  # E5: normalize(text + image)
