"""
Data for Diffusion-RPO: preference pairs (prompt, winner image, loser image), SPEC §1.

Sources, one item format (build_dataset maps train.py's --data to them):
  1. A procedural toy set (no files, deterministic from a seed): coloured shapes on plain
     backgrounds. ToyPairs is the paper's Style Alignment task (SPEC §10): winner = the styled
     render, loser = the plain render of the same geometry. ToyImages gives single images for
     pretraining a toy base model with plain denoising.
  2. A JSONL manifest of real pairs (ManifestPairs), either {"prompt","winner","loser"} or the
     Pick-a-Pic form {"caption","image_0","image_1","label_0"} with ties dropped.
  3. Pick-a-Pic v2 itself: its parquet shards in a local folder (PickapicParquet, streamed a
     row group at a time, disjoint row groups per DDP rank), or the hub (PickapicHub, through
     the datasets library's streaming mode).
  4. A cache of everything the frozen encoders compute from a pair (CachedPairs, written by
     `python data.py cache`): training from it needs no VAE, text encoder or CLIP.
And one builder: `python data.py build-style` turns source images into Style Alignment pairs
with InstructPix2Pix edits (SPEC §10), written as a manifest (2.).

Every dataset returns dicts; collate_pairs stacks them. Images are float32 (3,R,R) in [-1, 1],
the range the SD VAE expects. Randomness is always derived from (seed, [epoch,] index), so an
item can be reproduced on its own and resuming needs no saved RNG state.

    python data.py cache --model sdxl --pretrained /models/sdxl --data pickapic:/data/pickapic_v2 \
        --out /data/cache-sdxl --flip --mixed_precision bf16
    python data.py build-style --style vangogh --src /data/pickapic_v2 --out /data/vangogh --limit 10000
"""
import glob
import io
import json
import os
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


class ImagePairs(torch.utils.data.Dataset):
    """What every source of real image pairs shares: resize, one crop and one flip for both
    images of a pair, and the SDXL size/crop conditioning. Subclasses find (prompt, winner,
    loser) and call self.pair_item."""

    def __init__(self, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        # Crop/flip randomness is keyed on the epoch, so each epoch sees new crops. The training
        # loop sets it; DataLoader workers copy the dataset at each iter() (unless
        # persistent_workers=True), so set it before iterating over the epoch.
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


def decode_image(source):
    """A path or JPEG/PNG bytes -> RGB PIL image, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")  # convert() forces the full decode here
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class ManifestPairs(ImagePairs):
    """Pairs listed in a JSONL file. Bad lines are skipped and counted at construction (one
    warning per reason); a corrupt image found while loading becomes a skip marker that
    collate_pairs drops, so one bad file never kills a long run."""

    def __init__(self, path, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        super().__init__(resolution, seed, random_crop, random_flip)
        self.pairs = []  # (prompt, winner_path, loser_path)
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
        win, los = decode_image(wpath), decode_image(lpath)
        if win is None or los is None:
            return {"skip": f"corrupt image: {wpath if win is None else lpath}", "index": i}
        return self.pair_item(prompt, win, los, i)


# ----------------------------------------------------------------------------------------------
# 3. Pick-a-Pic v2: local parquet shards (streamed a row group at a time), or the hub

PICKAPIC_HUB = "yuvalkirstain/pickapic_v2"  # train.py's data for real presets when --data is not given
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")  # all others are ignored
_SHARD_NAME = re.compile(r"^([A-Za-z_]+)-\d+-of-\d+")  # the hub layout: data/train-00000-of-00645-<hash>.parquet


def pickapic_row(caption, label):
    """(skip_reason, winner_column) for one Pick-a-Pic row: label_0 = 1 means image 0 won,
    0 means image 1 won, 0.5 is a tie (dropped: no preference to learn)."""
    if not isinstance(caption, str) or not caption.strip():
        return "missing_field", None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label != label:  # None, NaN
        return "bad_label", None
    if label == 0.5:
        return "tie", None
    if label not in (0, 1):
        return "bad_label", None
    return None, "jpg_0" if label == 1 else "jpg_1"


def _import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("error: --data pickapic:DIR reads parquet with pyarrow (pip install pyarrow)")
    return pq


class PickapicParquet(ImagePairs):
    """Pick-a-Pic v2 from its parquet shards in a local folder, at any size with flat memory.

    Construction reads only the small columns (caption, label_0) of every row group, keeping
    per row group the numbers of its usable rows: ~4 bytes a pair, 4 MB for the whole data set.
    Ties, empty captions, bad labels and files that lack a column are counted skips there.
    Images are read when a batch needs them, one row group at a time (the last `window` + 1
    row groups stay cached: memory is a few row groups of JPEG bytes, whatever the data size).

    Order (epoch_batches): every epoch shuffles the row groups (seed, epoch) and deals them to
    the ranks round-robin, so ranks read disjoint row groups and no pair is seen twice in an
    epoch; each rank shuffles the rows within consecutive windows of `window` of its row
    groups. Every rank knows every rank's pair count from the index, so all stop the epoch at
    the same batch (a pair left over on the larger ranks waits for a later epoch): DDP's
    collectives never wait on a rank that ran out. A corrupt JPEG shows up only when decoded:
    a skip marker, dropped by collate_pairs and counted by train.py, as for manifests."""

    def __init__(self, folder, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 window=4):
        super().__init__(resolution, seed, random_crop, random_flip)
        pq = _import_pyarrow()
        files = sorted(Path(folder).rglob("*.parquet"))
        if any(_SHARD_NAME.match(f.name) for f in files):  # hub layout: keep one split
            files = [f for f in files if (m := _SHARD_NAME.match(f.name)) and m[1] == split]
        if not files:
            raise FileNotFoundError(f"no {split}-*.parquet or other .parquet files under {folder}")
        self.files, self.window, self._open, self._cache = [str(f) for f in files], window, {}, {}
        units, rows = [], []  # units: (file, row group); rows: that row group's usable row numbers
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
                raise ValueError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:120]})")
            missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                self._skip("missing_column", pf.metadata.num_rows)
                print(f"warning: {path}: no column(s) {', '.join(missing)}; its {pf.metadata.num_rows} rows skipped",
                      file=sys.stderr)
                continue
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["caption", "label_0"])
                ok = []
                for r, (caption, label) in enumerate(zip(t.column("caption").to_pylist(),
                                                         t.column("label_0").to_pylist())):
                    reason, _ = pickapic_row(caption, label)
                    if reason:
                        self._skip(reason)
                    else:
                        ok.append(r)
                if ok:
                    units.append((fi, rg))
                    rows.append(np.asarray(ok, dtype=np.int32))
        self.units, self.rows = units, rows
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        if not units:
            raise ValueError(f"{folder}: no usable preference pairs (skipped: {self.skip_counts or 'empty'})")
        if self.skip_counts:
            print(f"{folder}: {len(self)} pairs in {len(units)} row groups of {len(files)} files; "
                  f"skipped {self.skip_counts}", file=sys.stderr)

    def _skip(self, reason, n=1):
        self.skip_counts[reason] = self.skip_counts.get(reason, 0) + n

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):  # DataLoader workers: open files and cached row groups stay behind
        return {**self.__dict__, "_open": {}, "_cache": {}}

    def epoch_batches(self, epoch, rank, world, batch_size):
        """This rank's batches (lists of item indices) for one epoch; every rank gets as many."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        counts = [sum(len(self.rows[u]) for u in order[r::world]) for r in range(world)]
        n_batches = min(counts) // batch_size
        mine, items, n = order[rank::world], [], 0
        for w in range(0, len(mine), self.window):
            if n >= n_batches * batch_size:
                break
            group = mine[w:w + self.window]
            idx = np.concatenate([self.starts[u] + np.arange(len(self.rows[u])) for u in group])
            items.append(np.random.default_rng([self.seed, epoch, int(group[0])]).permutation(idx))
            n += len(idx)
        items = np.concatenate(items)[:n_batches * batch_size].tolist() if n_batches else []
        return [items[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]

    def _row_group(self, u):
        if u not in self._cache:
            fi, rg = self.units[u]
            if fi not in self._open:
                self._open[fi] = _import_pyarrow().ParquetFile(self.files[fi])
            self._cache[u] = self._open[fi].read_row_group(rg, columns=list(PICKAPIC_COLUMNS))
            while len(self._cache) > self.window + 1:  # dicts keep insertion order: drop the oldest
                self._cache.pop(next(iter(self._cache)))
        return self._cache[u]

    def row(self, i):
        """Pair i undecoded: (caption, [(column, JPEG bytes) of the winner, of the loser], where
        it lives in the shards)."""
        u = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = int(self.rows[u][i - self.starts[u]])
        t = self._row_group(u)
        caption, label = t.column("caption")[r].as_py(), t.column("label_0")[r].as_py()
        _, won = pickapic_row(caption, label)
        lost = "jpg_1" if won == "jpg_0" else "jpg_0"
        fi, rg = self.units[u]
        images = [(c, t.column(c)[r].as_py() or b"") for c in (won, lost)]
        return caption, images, f"{self.files[fi]} row group {rg} row {r}"

    def __getitem__(self, i):
        caption, images, where = self.row(i)
        win, los = (decode_image(jpg) for _, jpg in images)
        if win is None or los is None:
            return {"skip": f"corrupt image: {where} {images[0 if win is None else 1][0]}", "index": i}
        return self.pair_item(caption, win, los, i)


class PickapicHub(ImagePairs):
    """Pick-a-Pic v2 (or a data set of the same columns) streamed from the hub by the `datasets`
    library: nothing is downloaded up front. stream() yields items and skip markers forever,
    epoch after epoch (a shuffle buffer reseeded each epoch); under DDP each rank reads its own
    part (datasets.distributed.split_dataset_by_node). Epoch lengths are not known in advance,
    so a rank's epoch boundary can fall a few batches apart from another's; resuming skips the
    rows already read. For exact epochs and resumes, download the shards and use pickapic:DIR."""

    def __init__(self, hub_id, resolution=512, seed=0, random_crop=False, random_flip=False, split="train",
                 shuffle_buffer=1000):
        super().__init__(resolution, seed, random_crop, random_flip)
        try:
            import datasets
        except ImportError:
            raise SystemExit(f"error: --data pickapic:{hub_id} streams with the datasets library (pip install "
                             f"datasets), or download the parquet shards and pass --data pickapic:/path/to/folder")
        self.hub_id, self.split, self.shuffle_buffer = hub_id, split, shuffle_buffer
        try:
            self.ds = datasets.load_dataset(hub_id, split=split, streaming=True)
            first = next(iter(self.ds))  # reaching the data is what can fail (no network, no such id)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise SystemExit(f"error: cannot stream the data set '{hub_id}' ({reason}). Without hub access, download "
                             f"its parquet shards once (huggingface-cli download --repo-type dataset {hub_id} "
                             f"--include 'data/{split}-*') and pass --data pickapic:/path/to/folder")
        missing = [c for c in PICKAPIC_COLUMNS if c not in first]
        if missing:
            raise SystemExit(f"error: data set '{hub_id}' has no column(s) {', '.join(missing)}")

    def __len__(self):  # unknown in advance; the log prints it, nothing sizes anything by it
        return 0

    def stream(self, epoch, rank=0, world=1, skip_rows=0):
        """(epoch, item or skip marker) pairs, endlessly, starting `skip_rows` rows into `epoch`."""
        from datasets.distributed import split_dataset_by_node
        ds = self.ds.select_columns(list(PICKAPIC_COLUMNS))
        if world > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        while True:
            ds.set_epoch(epoch)
            self.epoch = epoch
            for n, row in enumerate(ds):
                if n < skip_rows:  # resuming: these were read before (not ds.skip, which reorders a shuffled stream)
                    continue
                reason, won = pickapic_row(row["caption"], row["label_0"])
                if reason:
                    yield epoch, {"skip": reason, "index": n}
                    continue
                lost = "jpg_1" if won == "jpg_0" else "jpg_0"
                win, los = decode_image(row[won] or b""), decode_image(row[lost] or b"")
                if win is None or los is None:
                    yield epoch, {"skip": f"corrupt image: {self.hub_id} row {n}", "index": n}
                    continue
                yield epoch, self.pair_item(row["caption"], win, los, n)
            epoch, skip_rows = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# 4. Batching


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
    if "winner" in kept[0]:  # (CachedPairs items carry cache_* tensors instead of images)
        batch["winner"] = torch.stack([it["winner"] for it in kept])
    if "loser" in kept[0]:
        batch["loser"] = torch.stack([it["loser"] for it in kept])
    for key in ("original_size_w", "original_size_l", "crop_top_left"):
        if key in kept[0]:
            batch[key] = torch.tensor([it[key] for it in kept], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in kept], dtype=torch.long)
    for key in kept[0]:
        if key.startswith("cache_"):  # CachedPairs: latents, text states, E5 features
            batch[key] = torch.stack([it[key] for it in kept])
    if "styled" in kept[0]:
        batch["styled"] = torch.tensor([it["styled"] for it in kept], dtype=torch.bool)
    return batch


# ----------------------------------------------------------------------------------------------
# 5. One entry point for train.py


def build_dataset(spec, resolution, seed=0, split="train", style="winter", style_fraction=1 / 3,
                  random_crop=False, random_flip=False, num_items=8192, window=4, shuffle_buffer=1000,
                  model=None, pretrained=None, embed_model=None):
    """The data behind train.py's --data:
      toy               ToyPairs (procedural Style Alignment pairs; `split` of the toy prompts)
      toy-base          ToyImages (single images, for pretraining with --loss sft)
      PATH.jsonl        ManifestPairs
      pickapic:DIR      PickapicParquet: the parquet shards under DIR (file names <split>-*)
      pickapic:HUB_ID   PickapicHub: streamed by the datasets library (when DIR does not exist)
      cache:DIR         CachedPairs, checked against model / pretrained / embed_model
    Arguments that don't apply to the chosen kind are ignored."""
    spec = str(spec)
    if spec == "toy":
        return ToyPairs(num_items, resolution, seed, style, split)
    if spec == "toy-base":
        return ToyImages(num_items, resolution, seed, style, split, style_fraction)
    if spec.endswith(".jsonl"):
        return ManifestPairs(spec, resolution, seed, random_crop, random_flip)
    if spec.startswith("pickapic:"):
        where = spec[len("pickapic:"):]
        if os.path.isdir(where):
            return PickapicParquet(where, resolution, seed, random_crop, random_flip, split, window)
        if where.startswith((".", "/", "~")) or where.count("/") > 1:  # meant as a folder, not an org/name id
            raise FileNotFoundError(f"--data {spec}: no folder {where}")
        return PickapicHub(where, resolution, seed, random_crop, random_flip, split, shuffle_buffer)
    if spec.startswith("cache:"):
        if random_crop:
            raise ValueError("--data cache:DIR holds centre crops only; drop --random_crop (or train from raw images)")
        return CachedPairs(spec[len("cache:"):], model, pretrained, resolution, seed, random_flip, embed_model)
    raise ValueError(f"unknown data spec {spec!r}; expected toy, toy-base, a .jsonl manifest, pickapic:DIR, "
                     f"pickapic:HUB_ID or cache:DIR")


# ----------------------------------------------------------------------------------------------
# 6. Multi-modal embeddings for the RPO weights (E5)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(out):
    # transformers < 5 returns the projected features; 5.x wraps them in .pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_features(clip, tokenizer, prompts, images):
    """The two halves of E5 before they are combined: L2-normalised CLIP text features of the
    prompts (B, D) (None if prompts is None) and image features of `images` (N, D) (None if
    images is None). Images are (N,3,H,W) in [-1, 1], resized to CLIP's input size on the
    model's device (batched, no PIL)."""
    device = next(clip.parameters()).device
    text = image = None
    if prompts is not None:
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        text = torch.nn.functional.normalize(_features(clip.get_text_features(input_ids=ids)).float(), dim=-1)
    if images is not None:
        size = clip.config.vision_config.image_size
        x = (images.to(device, torch.float32) + 1) / 2
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        pixels = ((x - mean) / std).to(clip.dtype)
        image = torch.nn.functional.normalize(_features(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
    return text, image


def combine_features(text, image, mode="mean", rows=None):
    """E5: f(c, x) = normalize(text + image) ("mean"), or one of them ("text" / "image"). text
    (B, D) is repeated to `rows` (default: image's k·B rows; [winners; losers]: k = 2)."""
    if mode not in ("mean", "text", "image"):
        raise ValueError(f"embed mode must be 'mean', 'text' or 'image', got {mode!r}")
    rows = rows or len(image)
    parts = []
    if mode in ("mean", "text"):
        parts.append(text.repeat(rows // len(text), 1))
    if mode in ("mean", "image"):
        parts.append(image)
    return torch.nn.functional.normalize(sum(parts), dim=-1)  # E5: normalize(text + image)


@torch.no_grad()
def clip_embeddings(clip, tokenizer, prompts, images, mode="mean"):
    """f(c, x) for each sample, L2-normalised, float32 (k·B, D) (E5; combine_features).
    `images` may hold k images per prompt, in k blocks ([winners; losers]: k = 2): the text is
    encoded once and repeated, as model.encode_prompts does."""
    text, image = clip_features(clip, tokenizer, None if mode == "image" else prompts,
                                None if mode == "text" else images)
    return combine_features(text, image, mode, rows=len(images))


# ----------------------------------------------------------------------------------------------
# 7. Cached latents and embeddings ("offline data sampling")
#
# Everything frozen that training computes from a pair, computed once: the VAE posterior of
# winner and loser (mean and std, so that z = s·(μ + σ·n) is still re-sampled every time it is
# used, exactly as from the raw image), the text encoders' outputs, and the two halves of the
# E5 embedding (CLIP text and image features, combined at training time so --embed can still be
# chosen then). train.py --data cache:DIR then needs neither the VAE, nor the text encoders, nor
# CLIP. Centre crops only (the cache holds one crop); --flip adds the mirrored images.

CACHE_FORMAT = "rpo-diffusion-cache/1"
PER_PROMPT = ("text_hidden", "text_pooled", "clip_text")  # stored once per distinct prompt of a shard
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cache_identity(model, pretrained):
    import model as M
    return {"model": model, "pretrained": pretrained or M.PRESETS[model]["pretrained"]}


@torch.no_grad()
def build_cache(model, data_spec, out, pretrained=None, resolution=None, flip=False, batch_size=16, device="cpu",
                mixed_precision="no", embed_model=None, dtype="fp16", shard_size=1024, split="train", seed=0,
                num_items=8192, num_workers=0, progress=True, part=0, parts=1):
    """One pass over a pair data set (in index order, centre crops) -> safetensors shards and
    OUT/index.json. Returns the index dict. part/parts: this process caches the part-th of
    `parts` equal, contiguous index ranges and writes index-PPP-of-NNN.json instead; CachedPairs
    joins the parts in order, so N processes (one per GPU: torchrun) build the cache one would."""
    import model as M
    from safetensors.torch import save_file
    resolution = resolution or M.PRESETS[model]["resolution"]
    dataset = build_dataset(data_spec, resolution, seed=seed, split=split, num_items=num_items)
    if not isinstance(dataset, (ToyPairs, ImagePairs)) or isinstance(dataset, (ToyImages, PickapicHub)):
        raise ValueError(f"cache: --data {data_spec} is not a pair data set that can be read in order "
                         f"(toy, a .jsonl manifest or pickapic:DIR)")
    m = M.load_models(model, pretrained, device=device, mixed_precision=mixed_precision, reference=False)
    m.unet = None  # only the frozen encoders are needed here
    m.resolution = resolution
    embed_model = embed_model or ("tiny" if M.PRESETS[model]["pretrained"] is None else "openai/clip-vit-large-patch14")
    clip, clip_tok = M.load_embedder(embed_model, device)
    store = CACHE_DTYPES[dtype]
    os.makedirs(out, exist_ok=True)
    lo, hi = part * len(dataset) // parts, (part + 1) * len(dataset) // parts
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                         collate_fn=collate_pairs, num_workers=num_workers)
    # index-level skips (ties, ...) belong to the whole data set: counted by part 0 only
    shards, buf, skips, n_pairs = [], {}, dict(getattr(dataset, "skip_counts", {})) if part == 0 else {}, 0

    def write_shard():
        # Per-prompt tensors (text states, E5 text features) once per distinct prompt in the
        # shard, and a prompt_row per pair: Pick-a-Pic has ~15 pairs per caption, often adjacent.
        nonlocal buf
        prompts = buf["prompt"]
        distinct = list(dict.fromkeys(prompts))
        first = torch.tensor([prompts.index(p) for p in distinct])
        row = {p: j for j, p in enumerate(distinct)}
        tensors = {k: torch.cat(v)[first] if k in PER_PROMPT else torch.cat(v) for k, v in buf.items() if k != "prompt"}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        tensors["prompt_row"] = torch.tensor([row[p] for p in prompts])
        name = f"shard-{len(shards):05d}.safetensors" if parts == 1 else f"shard-{part:03d}-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(out, name + ".tmp"), metadata={"prompts": json.dumps(distinct)})
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))  # atomic: whole shards only
        shards.append({"file": name, "num_pairs": len(buf["prompt"])})
        buf = {}

    def latent_parts(images):
        if m.vae is None:  # pixel space: the "latent" is the image itself, no posterior noise
            return {"latent": images.to(store)}
        post = m.vae.encode(images.to(m.device, m.vae.dtype)).latent_dist
        return {"latent": post.mean.to(store).cpu(), "latent_std": post.std.to(store).cpu()}

    from tqdm import tqdm
    for batch in tqdm(loader, desc=f"caching {data_spec}", disable=not progress):
        for reason in batch["skipped"]:
            kind = reason.split(":")[0]
            skips[kind] = skips.get(kind, 0) + 1
        if not batch["prompt"]:
            continue
        B = len(batch["prompt"])
        rows = {"prompt": list(batch["prompt"])}
        views = {"": torch.cat([batch["winner"], batch["loser"]])}
        if flip:
            views["_flip"] = views[""].flip(-1)  # = the mirrored crop, what random_flip would train on
        for suffix, images in views.items():
            for name, z in latent_parts(images).items():
                rows[f"{name}_w{suffix}"], rows[f"{name}_l{suffix}"] = z.chunk(2)
            _, image_feat = clip_features(clip, clip_tok, None, images)
            rows[f"clip_image_w{suffix}"], rows[f"clip_image_l{suffix}"] = image_feat.cpu().chunk(2)
        hidden, pooled = M.encode_text(m, batch["prompt"])
        rows["text_hidden"] = hidden.to(store).cpu()
        if pooled is not None:
            rows["text_pooled"] = pooled.to(store).cpu()
        rows["clip_text"] = clip_features(clip, clip_tok, batch["prompt"], None)[0].cpu()
        for key in ("original_size_w", "original_size_l", "crop_top_left"):
            rows[key] = batch[key]
        for k, v in rows.items():  # tensors: one per batch, concatenated per shard; prompts: one list
            if k == "prompt":
                buf.setdefault(k, []).extend(v)
            else:
                buf.setdefault(k, []).append(v)
        n_pairs += B
        if len(buf["prompt"]) >= shard_size:
            write_shard()
    if buf:
        write_shard()
    if not n_pairs:
        raise ValueError(f"cache: --data {data_spec} gave no usable pairs (skipped: {skips})")
    # Caption dropout (classifier-free guidance) trains on the empty prompt: its states, once.
    hidden, pooled = M.encode_text(m, [""])
    empty = {"text_hidden": hidden.to(store).cpu(), "clip_text": clip_features(clip, clip_tok, [""], None)[0].cpu()}
    if pooled is not None:
        empty["text_pooled"] = pooled.to(store).cpu()
    save_file(empty, os.path.join(out, f"empty.safetensors.tmp{part}"))  # (every part writes the same file)
    os.replace(os.path.join(out, f"empty.safetensors.tmp{part}"), os.path.join(out, "empty.safetensors"))
    index = dict(format=CACHE_FORMAT, **_cache_identity(model, pretrained), xl=m.xl, resolution=resolution,
                 vae_scale=m.vae_scale, latents="image" if m.vae is None else "posterior (mean, std)",
                 embed_model=embed_model, dtype=dtype, flip=flip, data=data_spec, num_pairs=n_pairs,
                 skip_counts=skips, shards=shards)
    name = "index.json" if parts == 1 else f"index-{part:03d}-of-{parts:03d}.json"
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(index, f, indent=1)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return index


def read_cache_index(folder):
    """index.json, or the index-PPP-of-NNN.json of a cache built in parts, joined in part order."""
    path = os.path.join(folder, "index.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    found = sorted(glob.glob(os.path.join(folder, "index-[0-9][0-9][0-9]-of-[0-9][0-9][0-9].json")))
    if not found:
        raise FileNotFoundError(f"no cache at {folder} (index.json missing; build one with python data.py cache)")
    parts = int(found[0][-8:-5])
    want = [os.path.join(folder, f"index-{p:03d}-of-{parts:03d}.json") for p in range(parts)]
    if found != want:
        raise FileNotFoundError(f"cache {folder} is incomplete: {len(set(found) & set(want))} of its {parts} part "
                                f"indexes (index-PPP-of-{parts:03d}.json) are there; the build did not finish")
    indices = []
    for p in want:
        with open(p) as f:
            indices.append(json.load(f))
    index = dict(indices[0], shards=[s for i in indices for s in i["shards"]], skip_counts={},
                 num_pairs=sum(i["num_pairs"] for i in indices))
    for i in indices:
        for k, v in i["skip_counts"].items():
            index["skip_counts"][k] = index["skip_counts"].get(k, 0) + v
    return index


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from a build_cache folder. Items carry the cached tensors under "cache_*" keys
    (collate_pairs stacks them); train.py turns them into latents, conditioning and E5 embeddings
    without any encoder. Refuses a cache built for another model or resolution."""

    def __init__(self, folder, model, pretrained=None, resolution=None, seed=0, random_flip=False, embed_model=None):
        self.index = index = read_cache_index(folder)
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{folder}: not a {CACHE_FORMAT} cache (format {index.get('format')!r})")
        want, have = _cache_identity(model, pretrained), {k: index[k] for k in ("model", "pretrained")}
        if want != have:
            name = lambda d: f"--model {d['model']}" + (f" --pretrained {d['pretrained']}" if d["pretrained"] else "")
            raise ValueError(f"cache {folder} was built for {name(have)}, not {name(want)}; rebuild it with "
                             f"python data.py cache {name(want)} ...")
        if resolution not in (None, index["resolution"]):
            raise ValueError(f"cache {folder} holds {index['resolution']}px crops, not --resolution {resolution}")
        if embed_model not in (None, index["embed_model"]):
            raise ValueError(f"cache {folder} holds E5 features of --embed_model {index['embed_model']}, not {embed_model}")
        if random_flip and not index["flip"]:
            raise ValueError(f"cache {folder} has no mirrored images: rebuild it with --flip to train with --random_flip")
        self.folder, self.seed, self.random_flip, self.epoch = folder, seed, random_flip, 0
        self.resolution, self.skip_counts = index["resolution"], {}  # its skips were counted when it was built
        self.starts = np.cumsum([0] + [s["num_pairs"] for s in index["shards"]])
        self._open = {}
        from safetensors.torch import load_file
        self.empty = load_file(os.path.join(folder, "empty.safetensors"))

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def _shard(self, s):
        if s not in self._open:
            from safetensors import safe_open
            handle = safe_open(os.path.join(self.folder, self.index["shards"][s]["file"]), framework="pt")
            self._open[s] = (handle, json.loads(handle.metadata()["prompts"]))
        return self._open[s]

    def __getitem__(self, i):
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = i - int(self.starts[s])
        handle, prompts = self._shard(s)
        # Flip decision keyed on (seed, epoch, index) like the raw images' (its own draw).
        flip = self.random_flip and np.random.default_rng([self.seed, self.epoch, i, 1]).random() < 0.5
        p = int(handle.get_slice("prompt_row")[r:r + 1][0])
        item = {"prompt": prompts[p], "index": i}
        keys = handle.keys()
        for key in keys:
            if key.endswith("_flip") or key == "prompt_row":
                continue
            source = key + "_flip" if flip and key + "_flip" in keys else key
            k = p if key in PER_PROMPT else r
            value = handle.get_slice(source)[k:k + 1][0]
            if key in ("original_size_w", "original_size_l", "crop_top_left"):
                item[key] = tuple(value.tolist())
            else:
                item["cache_" + key] = value
        return item


# ----------------------------------------------------------------------------------------------
# 8. Style Alignment pairs from real images (SPEC §10): winner = the edited image, loser = source

STYLE_EDITS = {  # InstructPix2Pix instructions; "toy-*" are data.py's procedural edits (offline)
    "vangogh": "make it a Van Gogh painting",
    "sketch": "turn it into a pencil sketch",
    "winter": "make it winter",
    "toy-winter": None,
    "toy-sketch": None,
}


def style_sources(src, split="train"):
    """(source id, prompt, PIL image) for build-style: the winners of a .jsonl manifest, or the
    preferred images of a Pick-a-Pic parquet folder (ties and unreadable rows skipped, counted)."""
    if str(src).endswith(".jsonl"):
        ds = ManifestPairs(src)
        for i, (prompt, winner, _) in enumerate(ds.pairs):
            img = decode_image(winner)
            if img is not None:
                yield i, prompt, img
        return
    ds = PickapicParquet(src, split=split)
    for i in range(len(ds)):
        caption, ((_, preferred), _), _ = ds.row(i)
        img = decode_image(preferred)  # (the loser stays undecoded: build-style does not use it)
        if img is not None:
            yield i, caption, img


def square_crop(img, resolution):
    """Shorter side to `resolution`, centre crop: editor input and the loser share the framing."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def build_style(style, src, out, editor="timbrooks/instruct-pix2pix", limit=None, resolution=512, steps=20,
                guidance=7.5, image_guidance=1.5, batch_size=4, device="cpu", mixed_precision="no", seed=0,
                split="train", progress=True):
    """Edit each source image into `style` and append {"prompt", "winner", "loser", "source"}
    lines to OUT/pairs.jsonl (images under OUT/images/). Resumable: sources already in the
    manifest are skipped, and a line is written only after both of its images, so an
    interrupted run leaves at most orphan PNGs that the rerun overwrites. Returns new pairs."""
    if style not in STYLE_EDITS:
        raise ValueError(f"unknown --style {style!r}; choose from {', '.join(STYLE_EDITS)}")
    if not os.path.exists(src):
        raise FileNotFoundError(f"--src {src} not found")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    manifest = os.path.join(out, "pairs.jsonl")
    done = set()
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            done = {json.loads(line)["source"] for line in f if line.strip()}
    pipe = None
    if STYLE_EDITS[style] is not None:
        from diffusers import StableDiffusionInstructPix2PixPipeline
        import model as M
        try:  # the safety checker would turn flagged edits into black images: bad training data
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                editor, torch_dtype=M.DTYPES[mixed_precision], safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot load the InstructPix2Pix editor '{editor}' ({str(err).splitlines()[0][:160]}). "
                             f"Download it once and pass --editor /path/to/folder, or use --style toy-{style}")
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    todo = []
    new = 0

    def flush():
        nonlocal new
        if pipe is not None:
            edited = pipe(prompt=[STYLE_EDITS[style]] * len(todo), image=[img for _, _, img in todo],
                          num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                          generator=[torch.Generator().manual_seed(seed * 1_000_003 + i) for i, _, _ in todo]).images
        else:
            edited = [Image.fromarray(apply_style(np.asarray(img), style[4:], np.random.default_rng([seed, i])))
                      for i, _, img in todo]
        with open(manifest, "a", encoding="utf-8") as f:
            for (i, prompt, img), ed in zip(todo, edited):
                names = [f"images/{i:07d}_{kind}.png" for kind in ("edit", "source")]
                ed.convert("RGB").resize(img.size, Image.BICUBIC).save(os.path.join(out, names[0]))
                img.save(os.path.join(out, names[1]))
                f.write(json.dumps({"prompt": prompt, "winner": names[0], "loser": names[1], "source": i}) + "\n")
                f.flush()
                new += 1
        todo.clear()

    from tqdm import tqdm
    bar = tqdm(total=limit, desc=f"build-style {style}", disable=not progress)
    for i, prompt, img in style_sources(src, split):
        if limit is not None and len(done) + new + len(todo) >= limit:
            break
        if i in done:
            continue
        todo.append((i, prompt, square_crop(img, resolution)))
        if len(todo) == batch_size:
            flush()
            bar.update(batch_size)
    if todo:
        bar.update(len(todo))
        flush()
    bar.close()
    return new


# ----------------------------------------------------------------------------------------------
# Command line: python data.py cache ... | python data.py build-style ...


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Data preparation for rpo-diffusion.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="precompute latents, text states and E5 features for train.py --data cache:DIR")
    c.add_argument("--model", default="tiny", help="preset (model.py), as for train.py")
    c.add_argument("--pretrained", "--pretrained_model_name_or_path", default=None)
    c.add_argument("--data", required=True, help="toy, a .jsonl manifest or pickapic:DIR")
    c.add_argument("--data_split", default="train", help="pickapic: shard name prefix; toy: prompt split")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    c.add_argument("--flip", action="store_true", help="also store the mirrored images (for --random_flip)")
    c.add_argument("--embed_model", default=None, help="CLIP for E5, as train.py's (default: the same)")
    c.add_argument("--dtype", default="fp16", choices=list(CACHE_DTYPES), help="storage dtype of latents/text states")
    c.add_argument("--batch_size", type=int, default=16)
    c.add_argument("--shard_size", type=int, default=1024, help="pairs per safetensors shard")
    c.add_argument("--num_items", type=int, default=8192, help="toy: pairs")
    c.add_argument("--num_workers", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="encoders' compute dtype")
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("build-style", help="Style Alignment pairs: InstructPix2Pix edits (winner) of source images (loser)")
    s.add_argument("--style", required=True, choices=list(STYLE_EDITS))
    s.add_argument("--src", required=True, help="a .jsonl manifest (its winners) or a Pick-a-Pic parquet folder (preferred images)")
    s.add_argument("--out", required=True, help="writes OUT/pairs.jsonl and OUT/images/")
    s.add_argument("--limit", type=int, default=None, help="stop when the manifest holds this many pairs")
    s.add_argument("--editor", default="timbrooks/instruct-pix2pix", help="hub id or local folder")
    s.add_argument("--resolution", type=int, default=512)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=7.5, help="text guidance")
    s.add_argument("--image_guidance", type=float, default=1.5, help="image guidance (higher: closer to the source)")
    s.add_argument("--batch_size", type=int, default=4)
    s.add_argument("--src_split", default="train", help="Pick-a-Pic folder: shard name prefix")
    s.add_argument("--device", default="auto")
    s.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # torchrun data.py cache ...: every process caches its part on its own GPU; no communication
    part, parts = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if parts > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', part)}"
    try:
        if args.command == "cache":
            index = build_cache(args.model, args.data, args.out, args.pretrained, args.resolution, args.flip,
                                args.batch_size, device, args.mixed_precision, args.embed_model, args.dtype,
                                args.shard_size, args.data_split, args.seed, args.num_items, args.num_workers,
                                progress=part == 0, part=part, parts=parts)
            size = sum(os.path.getsize(os.path.join(args.out, s["file"])) for s in index["shards"])
            print(("" if parts == 1 else f"part {part + 1} of {parts}: ") +
                  f"cached {index['num_pairs']} pairs in {len(index['shards'])} shards ({size / 2**20:.1f} MiB) "
                  f"in {args.out}" + (f"; skipped {index['skip_counts']}" if index["skip_counts"] else ""))
        else:
            new = build_style(args.style, args.src, args.out, args.editor, args.limit, args.resolution, args.steps,
                              args.guidance, args.image_guidance, args.batch_size, device, args.mixed_precision,
                              args.seed, args.src_split)
            print(f"wrote {new} new pairs to {os.path.join(args.out, 'pairs.jsonl')}")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
