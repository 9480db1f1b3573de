"""
A cache of what the frozen encoders compute from each pair (VAE latents, text states, E5's CLIP
features), for train.py --data cache:DIR: training then loads no VAE, text encoder or CLIP.

    python -m tools.build_cache --model sdxl --pretrained /models/sdxl --data pickapic:/data/pickapic_v2 \\
        --out /data/cache-sdxl --flip --mixed_precision bf16

Under torchrun every process caches its part on its own GPU, with no communication. The format
and its checks are plumbing/cache.py's.
"""
import fnmatch
import os

import torch

import data
import model as M
from plumbing import cache, checks, files, hub, pickapic
from plumbing.images import ImagePairs


def build_cache(model, data_spec, out, pretrained=None, resolution=None, split="train", seed=0, num_items=8192,
                **kwargs):
    """The pairs of --data, in index order and centre-cropped, through
    the frozen encoders into OUT (cache.write_cache, which takes the other arguments)."""
    resolution = resolution or M.PRESETS[model]["resolution"]
    dataset = data.build_dataset(data_spec, resolution, seed=seed, split=split, num_items=num_items)
    if not isinstance(dataset, (data.ToyPairs, ImagePairs)) or isinstance(dataset, (data.ToyImages, pickapic.PickapicHub)):
        raise ValueError(f"cache: --data {data_spec} is not a pair data set that can be read in order "
                         f"(toy, a .jsonl manifest or pickapic:DIR)")
    return cache.write_cache(model, dataset, data_spec, out, pretrained, resolution, collate=data.collate_pairs, **kwargs)

def out_problem(out, overwrite, part, parts):
    """--out keeps train.py's rule for --out_dir: an empty folder, or with --overwrite an earlier
    cache, whose shards and indexes go first (new shards beside old ones, under an index that
    names only some of them, would be a cache no one asked for). Under torchrun each part checks
    and clears its own files (and index.json); the other parts' files of this build are left be."""
    mine = ["shard-*.safetensors", "index*.json", "empty.safetensors"] if parts == 1 else \
        [f"shard-{part:03d}-*.safetensors", f"index-{part:03d}-of-*.json", "index.json"]
    others = ["shard-*.safetensors*", "index-*-of-*.json*", "empty.safetensors*"]  # (tmp names too)

    def owned():
        return [os.path.join(out, n) for n in os.listdir(out) if any(fnmatch.fnmatch(n, m) for m in mine)]
    return files.output_folder_problem(out, "--out", mine, owned, overwrite, tolerated=others)


def main(argv=None):
    import argparse
    c = argparse.ArgumentParser(description="Precompute latents, text states and E5 features for train.py --data cache:DIR.")
    c.add_argument("--model", default="tiny", choices=list(M.PRESETS), help="preset (model.py), as for train.py")
    c.add_argument("--pretrained", "--pretrained_model_name_or_path", default=None)
    c.add_argument("--data", required=True, help="toy, a .jsonl manifest or pickapic:DIR")
    c.add_argument("--data_split", default="train", help="pickapic: shard name prefix; toy: prompt split")
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
    part, parts = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    problem = out_problem(args.out, args.overwrite, part, parts) or hub.pickled_flags_problem(
        args, ("--pretrained", "--embed_model"))  # before the encoders load
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
                            part=part, parts=parts)
        size = sum(os.path.getsize(os.path.join(args.out, s["file"])) for s in index["shards"])
        print(("" if parts == 1 else f"part {part + 1} of {parts}: ") +
              f"cached {index['num_pairs']} pairs in {len(index['shards'])} shards ({size / 2**20:.1f} MiB) "
              f"in {args.out}" + (f"; skipped {index['skip_counts']}" if index["skip_counts"] else ""))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
