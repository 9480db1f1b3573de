"""
Data for Diffusion-RPO: preference pairs (prompt, winner image, loser image); one entry point,
build_dataset, maps train.py's --data to a source:

  toy / toy-base    ToyPairs: the Style Alignment task on plumbing/images.py's procedural world (winner =
                    the styled render, loser = the plain one); ToyImages: single images for
                    pretraining a toy base model
  PATH.jsonl        ManifestPairs: {"prompt","winner","loser"} or Pick-a-Pic's
                    {"caption","image_0","image_1","label_0"} lines, ties dropped
  hf:DIR|ID[#S]     preference pairs in parquet, local shards or streamed from the hub, with a column
                    schema S: Pick-a-Pic, open-image-preferences, HPDv2 or a mapping (plumbing/pickapic.py);
                    pickapic:DIR|ID is the same with Pick-a-Pic's columns
  cache:DIR         what the frozen encoders compute from each pair, stored (plumbing/cache.py)

Every dataset returns dicts that collate_pairs stacks; stream_batches deals them out to
processes in a resumable order. Randomness is always derived from (seed, [epoch,] index), so
an item can be reproduced on its own and resuming needs no saved RNG state. Data preparation
lives in tools/: `python -m tools.build_cache` (cache:DIR) and `python -m tools.build_style`
(Style Alignment pairs from real images).
"""
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

import model as M
from plumbing import cache, pickapic
from plumbing import distributed as D
from plumbing.image_files import ImagePairs, is_file, read_image
from plumbing.images import STYLES, apply_style, image_to_tensor, render_toy, toy_prompts

# ----------------------------------------------------------------------------------------------
# 1. The toy Style Alignment set (plumbing/images.py draws the images)

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
    "bad_encoding": "that are not valid UTF-8",
    "bad_prompt": "with a prompt that is not valid text (a lone surrogate escape)",
}


def _manifest_lines(f):
    """(line number, bytes) of a file opened in binary, split at LF, CRLF or CR as text mode
    would, undecoded: one line of bad bytes must not reject the whole file."""
    n = 0
    for raw in f:
        parts = raw.rstrip(b"\n").split(b"\r")
        if len(parts) > 1 and parts[-1] == b"" and raw.endswith(b"\n"):
            parts.pop()  # the \r of a \r\n
        for part in parts:
            n += 1
            yield n, part


class ManifestPairs(ImagePairs):
    """Pairs listed in a JSONL file. Bad lines (unreadable JSON, bytes that are not UTF-8,
    missing fields or image files, ties, prompts that are not valid text) are skipped and
    counted at construction, one warning per reason. An image refused while loading (corrupt,
    too large, extreme aspect ratio: plumbing.image_files.read_image) makes a skip marker, which
    stream_batches reads past to the next readable pair: one bad file never kills a long run nor
    shrinks a batch. Each such image is named in one warning, the first time it is met (per
    process: each DataLoader worker keeps its own record, so one may name a file another named)."""

    def __init__(self, path, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.path = Path(path)
        if not is_file(self.path):
            raise FileNotFoundError(f"manifest not found: {path}")
        super().__init__(resolution, seed, random_crop, random_flip)
        self.pairs = []  # (prompt, winner_path, loser_path)
        self.warned = set()  # image paths already named in a warning
        first = {}  # reason -> "file:line detail" of the first occurrence
        root = self.path.parent
        with open(self.path, "rb") as f:
            for n, raw in _manifest_lines(f):
                try:  # (line 1 may start with the byte-order mark some Windows editors write)
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    reason, pair = "bad_encoding", None
                    detail = f"byte {raw[err.start]:#04x} at column {err.start + 1}"
                else:
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
        except (json.JSONDecodeError, RecursionError):  # (RecursionError: "[[[[..." nested too deep)
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
        try:  # JSON's "\\ud800" decodes to a str that no tokenizer (nor UTF-8) can encode
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            return "bad_prompt", prompt[:80], None
        paths = []
        for p in (winner, loser):
            full = root / p  # an absolute p wins over root in pathlib's "/"
            if not is_file(full):  # (also a name the file system cannot look up: over 255 bytes, ...)
                return "missing_image", p, None
            paths.append(full)
        return None, None, (prompt, paths[0], paths[1])

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        prompt, wpath, lpath = self.pairs[i]
        (win, wbad), (los, lbad) = read_image(wpath, self.resolution), read_image(lpath, self.resolution)
        for path, bad in ((wpath, wbad), (lpath, lbad)):
            if bad and path not in self.warned:
                self.warned.add(path)
                print(f"warning: {path}: {bad[0]} ({bad[1]}); pairs using it are skipped", file=sys.stderr)
        if wbad or lbad:  # "kind: path", counted by kind (count_skips)
            return {"skip": f"{(wbad or lbad)[0]}: {wpath if wbad else lpath}", "index": i}
        return self.pair_item(prompt, win, los, i)


# ----------------------------------------------------------------------------------------------
# 3. One entry point for train.py, and the order batches come in


def build_dataset(spec, resolution, seed=0, split="train", style="winter", style_fraction=1 / 3,
                  random_crop=False, random_flip=False, num_items=8192, window=4, shuffle_buffer=1000,
                  model=None, pretrained=None, embed_model=None):
    """The data behind train.py's --data:
      toy               ToyPairs (procedural Style Alignment pairs; `split` of the toy prompts)
      toy-base          ToyImages (single images, for pretraining with --loss sft)
      PATH.jsonl        ManifestPairs
      hf:DIR[#SCHEMA]   pickapic.ParquetPairs: the parquet shards under DIR (file names <split>-*)
      hf:ID[#SCHEMA]    pickapic.HubPairs: streamed by the datasets library (when DIR does not exist);
                        SCHEMA: pickapic, open-image-preferences, hpdv2 or a column mapping
                        (default: the id's, else the one the columns fit)
      pickapic:DIR|ID   the same with the pickapic schema (caption, jpg_0, jpg_1, label_0)
      cache:DIR         CachedPairs, checked against model / pretrained / embed_model
    Arguments that don't apply to the chosen kind are ignored."""
    spec = str(spec)
    if spec == "toy":
        return ToyPairs(num_items, resolution, seed, style, split)
    if spec == "toy-base":
        return ToyImages(num_items, resolution, seed, style, split, style_fraction)
    if spec.endswith(".jsonl"):
        return ManifestPairs(spec, resolution, seed, random_crop, random_flip)
    if spec.startswith(("hf:", "pickapic:")):
        return pickapic.open_pairs(spec, resolution, seed, random_crop, random_flip, split, window, shuffle_buffer)
    if spec.startswith("cache:"):
        if random_crop:
            raise ValueError("--data cache:DIR holds centre crops only; drop --random_crop (or train from raw images)")
        pretrained = pretrained or M.PRESETS.get(model, {}).get("pretrained")  # (the identity a cache was built for)
        return cache.CachedPairs(spec[len("cache:"):], model, pretrained, resolution, seed, random_flip, embed_model)
    raise ValueError(f"unknown data spec {spec!r}; expected toy, toy-base, a .jsonl manifest, hf:DIR, hf:HUB_ID "
                     f"(or pickapic:DIR|HUB_ID) or cache:DIR")


def from_args(args, world):
    """train.py's --data and data flags -> (dataset, resolution). Built before the models: a wrong path fails in seconds,
    not after loading SDXL."""
    resolution = args.resolution or M.PRESETS[args.model]["resolution"]  # also SDXL's target size in the time ids
    cached = args.data.startswith("cache:")
    try:
        dataset = build_dataset(args.data, args.resolution if cached else resolution, seed=args.seed,
                                split=args.data_split, style=args.style, style_fraction=args.style_fraction,
                                random_crop=args.random_crop, random_flip=args.random_flip, num_items=args.num_items,
                                window=args.shuffle_window, shuffle_buffer=args.shuffle_buffer, model=args.model,
                                pretrained=args.pretrained, embed_model=args.embed_model if args.loss == "rpo" else None)
    except (ValueError, OSError) as err:  # (OSError: a file that cannot be read, e.g. no permission)
        raise SystemExit(f"error: {err}")
    if args.loss != "sft" and isinstance(dataset, ToyImages):
        raise SystemExit("error: --data toy-base holds single images, not pairs; train it with --loss sft")
    if args.max_steps is None:  # --num_train_epochs (diffusers' scripts): whole passes over the data
        if hasattr(dataset, "stream"):
            raise SystemExit(f"error: --num_train_epochs needs a data set of known size; --data {args.data} streams: "
                             f"pass --max_steps")
        args.max_steps = math.ceil(args.num_train_epochs * len(dataset) / (args.batch_size * args.grad_accum * world))
    if not hasattr(dataset, "stream") and len(dataset) < args.batch_size * world:
        raise SystemExit(f"error: --data {args.data} has {len(dataset)} pairs, fewer than --batch_size {args.batch_size}"
                         + (f" × {world} ranks" if world > 1 else ""))
    return dataset, (dataset.resolution if cached else resolution)


def count_skips(counts, reasons):
    """Add a batch's skip reasons to `counts`, by kind: "corrupt image: PATH" -> "corrupt image"."""
    for reason in reasons:
        kind = reason.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1


def collate_pairs(items):
    """Stack item dicts into a batch; drop skip markers and report them in "skipped".
    Fields an item kind lacks (loser, original_size_l for ToyImages) come out as None."""
    kept = [it for it in items if "skip" not in it]
    skipped = [it["skip"] for it in items if "skip" in it]
    batch = dict.fromkeys(("winner", "loser", "original_size_w", "original_size_l",
                           "crop_top_left", "index"))  # all None until filled below
    batch.update(prompt=[it["prompt"] for it in kept], skipped=skipped)
    if not kept:  # (markers only: tools/build_cache.write_cache collates every item it reads, and moves on)
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


def stream_batches(dataset, batch_size, seed, epoch, item, rank=0, world=1, num_workers=0, device=None):
    """(epoch, item, batch) forever, from position (epoch, items read in the epoch). Every batch
    holds batch_size pairs: a skip marker (an unreadable image; hub: a tie, ...) is read past, its
    reason put in batch["skipped"] and counted in `item`; an epoch's end too short for a batch is
    dropped (a hub stream's batches run on across epochs).
    Map-style data: a per-epoch permutation seeded by (seed, epoch); a global micro-batch is
    batch_size × world consecutive items of it, and rank r takes items [r·B, (r+1)·B) of each:
    the ranks' union is what one process with batch_size B·W takes. One process reads the items
    one by one. Under torchrun, while any rank is short of pairs, every rank reads its part of
    the next B·W items too (distributed.all_ranks), leaving unused what it does not need, so the
    position is the same on every rank. It resumes exactly on the same number of ranks (without
    skips, on any number with the same B·W). pickapic:DIR deals whole row groups to ranks instead
    (dataset.epoch_batches): approximate on another number of ranks. pickapic:HUB_ID is read in
    stream order; `item` then counts rows read, over all ranks.
    num_workers > 0: DataLoader worker processes read the items, started once for the whole run;
    each index carries its epoch (EpochItems), so the items are the main process's, crops and
    flips included. device: a CUDA device gets each pair from pinned memory, moved as it comes
    (to_device), the batch stacked there; None or the CPU: batches as collated."""
    cuda, streamed = device is not None and torch.device(device).type == "cuda", hasattr(dataset, "stream")
    if streamed:  # (an item's index is its row in this rank's stream of the epoch)
        items = ((e, (it["index"] + 1) * world, it) for e, it in dataset.stream(epoch, rank, world, item // world))
    else:
        plan = lambda: _epoch_items(dataset, batch_size, seed, epoch, item, rank, world)
        # One DataLoader for the whole run, item by item (collate_fn: dict copies the item as it is): its workers (if
        # any) live from the first batch to the last, prefetching across epoch ends. It and the loop below walk one plan.
        keys = ((e, i) for e, _, i in plan())
        loader = torch.utils.data.DataLoader(EpochItems(dataset), sampler=keys, batch_size=None, collate_fn=dict,
                                             num_workers=num_workers, pin_memory=cuda,
                                             generator=torch.Generator().manual_seed(seed),
                                             prefetch_factor=2 * batch_size if num_workers else None)
        items = ((e, after, it) for (e, after, _), it in zip(plan(), loader))
    kept, skipped, dry = [], [], 0
    for (e, after), block in itertools.groupby(items, key=lambda x: x[:2]):  # one item, or a rank's B (torchrun)
        if e != epoch and not streamed:  # an epoch's end too short for a batch: dropped
            kept, dry = [], dry + 1
            if dry > 1:  # (on every rank at once)
                raise SystemExit(f"error: --data gave fewer than {batch_size} readable pairs in a whole epoch "
                                 f"({len(skipped)} items read past; the warnings above name the files)")
        epoch = e
        for _, _, it in block:
            if "skip" in it:
                skipped.append(it["skip"])
            elif len(kept) < batch_size:
                kept.append(to_device(it, device) if cuda else it)
        if D.all_ranks(len(kept) == batch_size, device) if world > 1 and not streamed else len(kept) == batch_size:
            yield D.largest(e, device) if streamed else e, after, dict(collate_pairs(kept), skipped=skipped)
            kept, skipped, dry = [], [], 0


def _epoch_items(dataset, batch_size, seed, epoch, item, rank, world):
    """(epoch, position after it, index) of each item this rank reads, forever: stream_batches'
    plan. One process: the epoch's order, item by item. Several: rank r's B items of each global
    micro-batch, each with the position after that micro-batch."""
    global_batch = batch_size * world
    while True:
        if hasattr(dataset, "epoch_batches"):
            batches = dataset.epoch_batches(epoch, rank, world, batch_size)
            order, batches = [i for b in batches for i in b], batches[item // global_batch:]
        else:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
            starts = range(item, len(order) - global_batch + 1, global_batch)
            batches = [order[s + rank * batch_size:s + (rank + 1) * batch_size] for s in starts]
        step = 1 if world == 1 else global_batch
        for k, indices in enumerate(((i,) for i in order[item:]) if world == 1 else batches, 1):
            for i in indices:
                yield epoch, item + k * step, i
        epoch, item = epoch + 1, 0


class EpochItems(torch.utils.data.Dataset):
    """dataset[i] as read in a given epoch: key (epoch, i). Crops and flips are drawn from
    (seed, epoch, index) (plumbing/image_files.py ImagePairs, plumbing/cache.py CachedPairs), and a
    DataLoader worker holds its own copy of the dataset, made when it starts: the epoch has to
    travel with the index, or a worker would crop every epoch as the one it started in."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        self.dataset.epoch = epoch
        return self.dataset[i]


# What the model reads from a batch in bulk, moved to the GPU as it arrives: the images, or a
# cache's latents, text states and CLIP features. The index, sizes and crop corners stay on the
# CPU, where the conditioning is assembled from them.
BULK = ("winner", "loser")


def to_device(batch, device):
    """The batch with its image tensors (raw data) or cache_* tensors (cache:DIR) on `device`,
    copied without blocking the host (from pinned memory the copy overlaps the GPU's work)."""
    out = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and (key in BULK or key.startswith("cache_")):
            out[key] = value.to(device, non_blocking=True)
    return out
