"""
Cached latents and embeddings ("offline data sampling"): everything frozen that training
computes from a pair, computed once by `python -m tools.build_cache` (its write_cache), and read back by
CachedPairs for train.py --data cache:DIR.

The cache holds the VAE posterior of winner and loser (mean and std, so z = s·(μ + σ·n) is still
re-sampled each time, exactly as from the raw image), the text encoders' outputs, and the two
halves of the E5 embedding (CLIP text and image features, combined at training time so --embed
can still be chosen then). Training from it needs neither the VAE, the text encoders nor CLIP.
Centre crops only (one crop is stored); --flip adds the mirrored images.
"""
import glob
import json
import os

import numpy as np
import torch

from plumbing import hub

CACHE_FORMAT = "rpo-diffusion-cache/1"
PER_PROMPT = ("text_hidden", "text_pooled", "clip_text")  # stored once per distinct prompt of a shard
CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# What CachedPairs and train.py read from an index, and its JSON type.
_INDEX_KEYS = {"model": str, "pretrained": (str, type(None)), "resolution": int, "embed_model": str,
               "flip": bool, "vae_scale": (int, float), "num_pairs": int, "skip_counts": dict, "shards": list}


def _load_index(path):
    """One index file -> its dict, checked, or a one-line ValueError naming the file and what is
    wrong (a half-written, hand-edited or foreign file must not surface as a KeyError)."""
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as err:  # (JSON and UTF-8 errors are ValueErrors)
        raise ValueError(f"{path}: unreadable cache index ({hub.first_line(err)})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: not a cache index (a JSON {type(index).__name__}, not an object)")
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a {CACHE_FORMAT} cache index (format {index.get('format')!r})")
    for key, kind in _INDEX_KEYS.items():
        if key not in index:
            raise ValueError(f"{path}: cache index has no {key!r} (rebuild it with python -m tools.build_cache)")
        if not isinstance(index[key], kind) or (kind is not bool and isinstance(index[key], bool)):
            raise ValueError(f"{path}: cache index {key!r} is {index[key]!r:.80}, of the wrong type")
    if not 0 < index["vae_scale"] < float("inf"):  # (z = s·(μ + σ·n): 0 would train on blank latents, nan on nothing)
        raise ValueError(f"{path}: cache index 'vae_scale' is {index['vae_scale']!r}, not a positive finite number")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in index["skip_counts"].values()):
        raise ValueError(f"{path}: cache index 'skip_counts' {index['skip_counts']!r:.80} are not counts (whole numbers >= 0)")
    for s in index["shards"]:  # (a shard is a file of the cache's own folder: a plain name, never a path out of it)
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and s["file"] not in ("", ".", "..")
                and os.path.basename(s["file"]) == s["file"] and "\0" not in s["file"]
                and isinstance(s.get("num_pairs"), int) and not isinstance(s["num_pairs"], bool) and s["num_pairs"] >= 0):
            raise ValueError(f"{path}: cache index shard entry {s!r:.80} is not "
                             '{"file": NAME (in the cache folder), "num_pairs": N >= 0}')
    return index


def read_cache_index(folder):
    """index.json, or the index-PPP-of-NNN.json of a cache built in parts, joined in part order.
    Each file is checked (_load_index); parts of different builds are refused."""
    path = os.path.join(folder, "index.json")
    if os.path.isfile(path):
        return _load_index(path)
    found = sorted(glob.glob(os.path.join(folder, "index-[0-9][0-9][0-9]-of-[0-9][0-9][0-9].json")))
    if not found:
        raise FileNotFoundError(f"no cache at {folder} (index.json missing; build one with python -m tools.build_cache)")
    parts = int(found[0][-8:-5])
    want = [os.path.join(folder, f"index-{p:03d}-of-{parts:03d}.json") for p in range(parts)]
    if found != want:
        raise FileNotFoundError(f"cache {folder} is incomplete: {len(set(found) & set(want))} of its {parts} part "
                                f"indexes (index-PPP-of-{parts:03d}.json) are there; the build did not finish")
    indices = [_load_index(p) for p in want]
    same = lambda i: {k: v for k, v in i.items() if k not in ("shards", "num_pairs", "skip_counts")}
    for p, i in zip(want, indices):
        if same(i) != same(indices[0]):
            raise ValueError(f"{p}: a part of another cache build than {want[0]} (settings differ); rebuild the cache")
    index = dict(indices[0], shards=[s for i in indices for s in i["shards"]], skip_counts={},
                 num_pairs=sum(i["num_pairs"] for i in indices))
    for i in indices:
        for k, v in i["skip_counts"].items():
            index["skip_counts"][k] = index["skip_counts"].get(k, 0) + v
    return index


def _check_files(folder, index):
    """Every file the index lists exists, and its safetensors header parses and agrees with the
    index: a missing or truncated shard fails at start-up, not hours into training. Reads
    headers only (safetensors checks the file covers every tensor the header lists)."""
    from safetensors import SafetensorError, safe_open
    for s in index["shards"]:
        path = os.path.join(folder, s["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: cache shard missing (listed in the index); rebuild the cache")
        try:
            with safe_open(path, framework="pt") as f:
                prompts = json.loads((f.metadata() or {}).get("prompts", "null"))
                rows = {k: f.get_slice(k).get_shape()[:1] for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable cache shard, truncated or not safetensors "
                             f"({hub.first_line(err)}); rebuild the cache") from None
        if not isinstance(prompts, list) or "prompt_row" not in rows:
            raise ValueError(f"{path}: not a cache shard (no prompt list or prompt_row)")
        for k, r in rows.items():
            want = len(prompts) if k in PER_PROMPT else s["num_pairs"]
            if r != [want]:
                raise ValueError(f"{path}: {k} has {r[0] if r else 'no'} rows, not {want}; rebuild the cache")
    path = os.path.join(folder, "empty.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the cache build did not finish); rebuild the cache")
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: unreadable ({hub.first_line(err)}); rebuild the cache") from None


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from a build_cache folder. Items carry the cached tensors under "cache_*" keys
    (data.collate_pairs stacks them); train.py turns them into latents, conditioning and E5 embeddings
    without any encoder. Refuses a cache built for another model or resolution, and, with a
    one-line error naming the file, a damaged one: an index that is not JSON, not an object or
    lacks a key; a shard that is missing, truncated or disagrees with the index."""

    def __init__(self, folder, model, pretrained=None, resolution=None, seed=0, random_flip=False, embed_model=None):
        self.index = index = read_cache_index(folder)
        want, have = {"model": model, "pretrained": pretrained}, {k: index[k] for k in ("model", "pretrained")}
        if want != have:
            name = lambda d: f"--model {d['model']}" + (f" --pretrained {d['pretrained']}" if d["pretrained"] else "")
            raise ValueError(f"cache {folder} was built for {name(have)}, not {name(want)}; rebuild it with "
                             f"python -m tools.build_cache {name(want)} ...")
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
        self.empty = _check_files(folder, index)  # the empty prompt's states (caption dropout)

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
