"""
HPDv2 (Human Preference Dataset v2, the hub data set ymhao/HPDv2) as published -> parquet shards
that train.py reads with --data hf:DIR (the hpdv2 schema of plumbing/pickapic.py).

    hf download --repo-type dataset ymhao/HPDv2 train.json train.tar.gz --local-dir /data/HPD
    tar -xzf /data/HPD/train.tar.gz -C /data/HPD           # the images, under /data/HPD/train/
    python -m tools.hpdv2_to_parquet --json /data/HPD/train.json --images /data/HPD/train --out /data/hpdv2
    python train.py --model sd15 --pretrained /models/sd15 --data hf:/data/hpdv2 ...

Why a converter: the hub repo holds annotation files, tar archives of images and a loading script
(HPDv2.py), and datasets 4 and later no longer run loading scripts. The annotation files, as the
data set's card and HPSv2's README describe them:

  train.json   [{"prompt": str, "file_path": [str, ...], "human_preference": [int, ...]}, ...]
               human_preference holds 1 for the preferred image, 0 for the other (one per path)
  test.json    [{"prompt": str, "image_path": [str, ...], "rank": [int, ...], "raw_annotations": [...]}, ...]
               rank: the averaged rank of each image, smaller = preferred (HPSv2's evaluation
               compares it with the images sorted by descending score)

Paths are relative to the split's image folder (--images). Either file is read (file_path or
image_path, human_preference or rank); a record of n images becomes its n·(n-1)/2 pairs, ties
left out. Each row written: prompt, image (a list of two {bytes, path} structs, datasets' Image
layout), human_preference ([1, 0]: the first preferred; [0, 1]: the second). Images are copied
into every pair they are in. Counted skips: ties, records that are not a prompt with matching
lists, paths that leave --images (never read) and missing image files.
"""
import argparse
import fnmatch
import json
import math
import os
import sys

from plumbing import checks, files


def numbers(xs):
    """A list of finite numbers (json reads NaN and Infinity: a NaN compared with anything is a
    preference for the second image, without a word)."""
    return isinstance(xs, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                        for x in xs)


def pairs_of(record):
    """(prompt, [(path_a, path_b, [pref_a, pref_b]), ...], ties) of one annotation record, or
    (None, [], 0) for a record that is not one."""
    if not isinstance(record, dict):
        return None, [], 0
    prompt, paths = record.get("prompt"), record.get("file_path", record.get("image_path"))
    if numbers(record.get("human_preference")):
        score = record["human_preference"]  # larger = preferred
    elif numbers(record.get("rank")):
        score = [-r for r in record["rank"]]  # smaller rank = preferred
    else:
        score = None
    ok = (isinstance(prompt, str) and prompt.strip() and isinstance(paths, list) and score is not None
          and len(paths) == len(score) >= 2 and all(isinstance(p, str) for p in paths))
    if not ok:
        return None, [], 0
    out, ties = [], 0
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            if score[i] == score[j]:
                ties += 1
            else:
                out.append((paths[i], paths[j], [1, 0] if score[i] > score[j] else [0, 1]))
    return prompt, out, ties


def inside(folder, rel):
    """The real path of folder/rel when it lies inside folder (symlinks resolved), else None."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, rel))
    return path if os.path.commonpath([root, path]) == root and path != root else None


def convert(json_path, images, out, split="train", shard_rows=1000, row_group_rows=100, earlier=None):
    """Write OUT/{split}-NNNNN-of-MMMMM.parquet; returns (pairs written, {skip reason: count}).
    earlier(): the paths of an earlier output (--overwrite), deleted only once the new shards are
    whole, just before they take their names: a mistake in the input never costs the old ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {json_path} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    if not isinstance(records, list):
        raise SystemExit(f"error: {json_path} is not HPDv2's annotation list (a JSON list of records)")
    if not os.path.isdir(images):
        raise SystemExit(f"error: --images {images}: no such folder (unpack {split}.tar.gz there)")
    os.makedirs(out, exist_ok=True)
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    schema = pa.schema([("prompt", pa.string()), ("image", image_type), ("human_preference", pa.list_(pa.int64()))])
    skips, rows, shards, written = {}, [], [], 0

    def skip(reason, n=1):
        if n:
            skips[reason] = skips.get(reason, 0) + n

    def flush():
        if rows:
            tmp = os.path.join(out, f".{split}-{len(shards):05d}.parquet.tmp")
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, tmp, row_group_size=row_group_rows)
            shards.append(tmp)
            rows.clear()

    for record in records:
        prompt, pairs, ties = pairs_of(record)
        if prompt is None:
            skip("not a record")
            continue
        skip("tie", ties)
        for a, b, pref in pairs:
            cells = []
            for rel in (a, b):
                path = inside(images, rel)
                if path is None:
                    skip("path outside --images")
                    break
                if not os.path.isfile(path):
                    skip("missing image")
                    break
                with open(path, "rb") as f:
                    cells.append({"bytes": f.read(), "path": rel})
            if len(cells) == 2:
                rows.append({"prompt": prompt, "image": cells, "human_preference": pref})
                written += 1
                if len(rows) >= shard_rows:
                    flush()
    flush()
    for path in earlier() if earlier and shards else []:
        if path not in shards:
            os.remove(path)
    for k, tmp in enumerate(shards):  # the hub's names, which hf:DIR reads by split
        os.replace(tmp, os.path.join(out, f"{split}-{k:05d}-of-{len(shards):05d}.parquet"))
    return written, skips


def main(argv=None):
    p = argparse.ArgumentParser(description="HPDv2's train.json / test.json and images -> parquet for --data hf:DIR.")
    p.add_argument("--json", required=True, help="train.json or test.json of ymhao/HPDv2")
    p.add_argument("--images", required=True, help="the split's unpacked image folder (train/ or test/)")
    p.add_argument("--out", required=True, help="folder for the parquet shards: empty (or created), or an earlier "
                                                "output with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out's earlier shards of --split")
    p.add_argument("--split", default="train", help="shard name prefix (train.py --data_split)")
    p.add_argument("--shard_rows", type=int, default=1000, help="pairs per parquet file")
    p.add_argument("--row_group_rows", type=int, default=100, help="pairs per row group (what hf:DIR reads at once)")
    args = p.parse_args(argv)
    checks.plain_numbers(p, args)
    if args.shard_rows < 1 or args.row_group_rows < 1:
        raise SystemExit("error: --shard_rows and --row_group_rows must be at least 1")
    if not args.split or args.split.startswith(".") or any(c in args.split for c in "/\\*?[\0"):
        raise SystemExit(f"error: --split {args.split!r}: a name for the shards (train, test), not a path or pattern")
    # train.py's rule for a folder it writes: empty, or its own output (old shards beside new ones,
    # -of-00003 beside -of-00005, would be read as one data set); another split's shards may stay
    mine = [f"{args.split}-*-of-*.parquet", f".{args.split}-*.parquet.tmp"]
    owned = lambda: [os.path.join(args.out, n) for n in os.listdir(args.out) if any(fnmatch.fnmatch(n, m) for m in mine)]
    problem = files.output_folder_problem(args.out, "--out", mine, owned, args.overwrite,
                                          tolerated=["*-*-of-*.parquet", ".*.parquet.tmp"], delete=False)
    if problem:
        raise SystemExit(problem)
    written, skips = convert(args.json, args.images, args.out, args.split, args.shard_rows, args.row_group_rows,
                             earlier=owned if args.overwrite else None)
    print(f"wrote {written} pairs to {args.out}" + (f"; skipped {skips}" if skips else ""), file=sys.stderr)
    if not written:
        raise SystemExit(f"error: no pairs written from {args.json} (skipped: {skips or 'nothing to read'})")


if __name__ == "__main__":
    main()
