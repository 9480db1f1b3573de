"""
A cache of what the frozen encoders compute from each pair (VAE latents, text states, E5's CLIP
features), for train.py --data cache:DIR: training then loads no VAE, text encoder or CLIP.

    python -m tools.build_cache --model sdxl --pretrained /models/sdxl --data pickapic:/data/pickapic_v2 \\
        --out /data/cache-sdxl --flip --mixed_precision bf16

Under torchrun every process caches its part on its own GPU, with no communication. The format,
its checks and its reader (CachedPairs) are plumbing/cache.py's; the writer is write_cache here.
"""
import fnmatch
import json
import os

import torch

import data
import model as M
from plumbing import cache, checks, files, hub, pickapic
from plumbing.image_files import ImagePairs


def build_cache(model, data_spec, out, pretrained=None, resolution=None, split="train", seed=0, num_items=8192,
                **kwargs):
    """The pairs of --data, in index order and centre-cropped, through
    the frozen encoders into OUT (write_cache, which takes the other arguments)."""
    resolution = resolution or M.PRESETS[model]["resolution"]
    dataset = data.build_dataset(data_spec, resolution, seed=seed, split=split, num_items=num_items)
    if not isinstance(dataset, (data.ToyPairs, ImagePairs)) or isinstance(dataset, (data.ToyImages, pickapic.PickapicHub)):
        raise ValueError(f"cache: --data {data_spec} is not a pair data set that can be read in order "
                         f"(toy, a .jsonl manifest, hf:DIR or pickapic:DIR)")
    return write_cache(model, dataset, data_spec, out, pretrained, resolution, collate=data.collate_pairs, **kwargs)

@torch.no_grad()
def write_cache(model, dataset, data_spec, out, pretrained=None, resolution=None, flip=False, batch_size=16,
                device="cpu", mixed_precision="no", embed_model=None, dtype="fp16", shard_size=1024,
                num_workers=0, progress=True, part=0, parts=1, collate=None, clear=None):
    """One pass over a pair data set (in index order, centre crops; build_cache makes it from a
    --data spec) -> safetensors shards and OUT/index.json, in plumbing/cache.py's format. Returns the index dict.
    part/parts: this process caches the part-th of `parts` equal, contiguous index ranges and
    writes index-PPP-of-NNN.json instead; CachedPairs joins the parts in order, so N processes
    (one per GPU: torchrun) build the cache one would. clear: called once the data set and the
    encoders have loaded, before anything is written (--overwrite deletes the earlier cache then)."""
    from safetensors.torch import save_file
    m = M.load_models(model, pretrained, device=device, mixed_precision=mixed_precision, reference=False)
    m.unet = None  # only the frozen encoders are needed here
    m.resolution = resolution
    embed_model = embed_model or M.default_embed_model(model, pretrained)
    clip, clip_tok = M.load_embedder(embed_model, device)
    store = cache.CACHE_DTYPES[dtype]
    if clear:
        clear()
    os.makedirs(out, exist_ok=True)
    lo, hi = part * len(dataset) // parts, (part + 1) * len(dataset) // parts
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                         collate_fn=collate, num_workers=num_workers)
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
        tensors = {k: torch.cat(v)[first] if k in cache.PER_PROMPT else torch.cat(v) for k, v in buf.items() if k != "prompt"}
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
        data.count_skips(skips, batch["skipped"])
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
            _, image_feat = M.clip_features(clip, clip_tok, None, images)
            rows[f"clip_image_w{suffix}"], rows[f"clip_image_l{suffix}"] = image_feat.cpu().chunk(2)
        hidden, pooled = M.encode_text(m, batch["prompt"])
        rows["text_hidden"] = hidden.to(store).cpu()
        if pooled is not None:
            rows["text_pooled"] = pooled.to(store).cpu()
        rows["clip_text"] = M.clip_features(clip, clip_tok, batch["prompt"], None)[0].cpu()
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
    empty = {"text_hidden": hidden.to(store).cpu(), "clip_text": M.clip_features(clip, clip_tok, [""], None)[0].cpu()}
    if pooled is not None:
        empty["text_pooled"] = pooled.to(store).cpu()
    save_file(empty, os.path.join(out, f"empty.safetensors.tmp{part}"))  # (every part writes the same file)
    os.replace(os.path.join(out, f"empty.safetensors.tmp{part}"), os.path.join(out, "empty.safetensors"))
    index = dict(format=cache.CACHE_FORMAT, model=model, pretrained=pretrained or M.PRESETS[model]["pretrained"], xl=m.xl, resolution=resolution,
                 vae_scale=m.vae_scale, latents="image" if m.vae is None else "posterior (mean, std)",
                 embed_model=embed_model, dtype=dtype, flip=flip, data=data_spec, num_pairs=n_pairs,
                 skip_counts=skips, shards=shards)
    name = "index.json" if parts == 1 else f"index-{part:03d}-of-{parts:03d}.json"
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(index, f, indent=1)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    return index


def out_problem(out, overwrite, part, parts, delete=True):
    """--out keeps train.py's rule for --out_dir: an empty folder, or with --overwrite an earlier
    cache, whose shards and indexes go first (new shards beside old ones, under an index that
    names only some of them, would be a cache no one asked for), with delete=False not yet (main
    checks first and deletes once the inputs have loaded). Under torchrun each part checks
    and clears its own files (and index.json); the other parts' files of this build are left be."""
    mine = ["shard-*.safetensors", "index*.json", "empty.safetensors"] if parts == 1 else \
        [f"shard-{part:03d}-*.safetensors", f"index-{part:03d}-of-*.json", "index.json"]
    others = ["shard-*.safetensors*", "index-*-of-*.json*", "empty.safetensors*"]  # (tmp names too)

    def owned():
        return [os.path.join(out, n) for n in os.listdir(out) if any(fnmatch.fnmatch(n, m) for m in mine)]
    return files.output_folder_problem(out, "--out", mine, owned, overwrite, tolerated=others, delete=delete)


def main(argv=None):
    import argparse
    c = argparse.ArgumentParser(description="Precompute latents, text states and E5 features for train.py --data cache:DIR.")
    c.add_argument("--model", default="tiny", choices=list(M.PRESETS), help="preset (model.py), as for train.py")
    c.add_argument("--pretrained", "--pretrained_model_name_or_path", default=None)
    c.add_argument("--data", required=True, help="toy, a .jsonl manifest, hf:DIR or pickapic:DIR")
    c.add_argument("--data_split", default="train", help="hf:/pickapic: shard name prefix; toy: prompt split")
    c.add_argument("--out", required=True, help="cache folder: empty (or created), or an earlier cache with --overwrite")
    c.add_argument("--overwrite", action="store_true", help="replace --out's earlier cache (its shards and indexes)")
    c.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    c.add_argument("--flip", action="store_true", help="also store the mirrored images (for --random_flip)")
    c.add_argument("--embed_model", default=None, help="CLIP for E5, as train.py's (default: the same)")
    c.add_argument("--dtype", default="fp16", choices=list(cache.CACHE_DTYPES), help="storage dtype of latents/text states")
    c.add_argument("--batch_size", type=int, default=16)
    c.add_argument("--shard_size", type=int, default=1024, help="pairs per safetensors shard")
    c.add_argument("--num_items", type=int, default=8192, help="toy: pairs")
    c.add_argument("--num_workers", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="encoders' compute dtype")
    c.add_argument("--seed", type=int, default=0)
    checks.one_name_each(c)  # (--pretrained and --pretrained_model_name_or_path: one of them)
    args = c.parse_args(argv)
    checks.plain_numbers(c, args, positive=("resolution", "batch_size", "shard_size", "num_items"),
                         non_negative=("num_workers", "seed"))
    multiple = M.PRESETS[args.model]["multiple"]  # (as train.py: what the preset's VAE and UNet down-sample by)
    if args.resolution is not None and args.resolution % multiple:
        raise SystemExit(f"error: --resolution must be a multiple of {multiple} for --model {args.model}, "
                         f"not {args.resolution}")
    if args.data.startswith("cache:"):
        raise SystemExit(f"error: --data {args.data} is a cache already; build one from pairs: toy, a .jsonl manifest, "
                         f"hf:DIR or pickapic:DIR")
    part, parts = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    problem = out_problem(args.out, args.overwrite, part, parts, delete=False) or hub.pickled_flags_problem(
        args, ("--pretrained", "--embed_model"))  # before the encoders load
    if problem:
        raise SystemExit(problem)

    def clear():  # --overwrite: the earlier cache goes only once the data and the encoders have loaded
        problem = out_problem(args.out, args.overwrite, part, parts)
        if problem:
            raise SystemExit(problem)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # torchrun -m tools.build_cache ...: every process caches its part on its own GPU; no communication
    if parts > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', part)}"
    try:
        index = build_cache(args.model, args.data, args.out, args.pretrained, args.resolution, args.data_split,
                            args.seed, args.num_items, flip=args.flip, batch_size=args.batch_size, device=device,
                            mixed_precision=args.mixed_precision, embed_model=args.embed_model, dtype=args.dtype,
                            shard_size=args.shard_size, num_workers=args.num_workers, progress=part == 0,
                            part=part, parts=parts, clear=clear)
        size = sum(os.path.getsize(os.path.join(args.out, s["file"])) for s in index["shards"])
        print(("" if parts == 1 else f"part {part + 1} of {parts}: ") +
              f"cached {index['num_pairs']} pairs in {len(index['shards'])} shards ({size / 2**20:.1f} MiB) "
              f"in {args.out}" + (f"; skipped {index['skip_counts']}" if index["skip_counts"] else ""))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
