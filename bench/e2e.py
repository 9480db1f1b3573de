"""
Does `python train.py --model sdxl` as users run it train at the speed bench/speed.py reports?
Three figures, alternated --repeat times, each run in a process of its own:

  bench    python -m bench.speed: the step alone on random latents and text states (SDXL 1024²,
           4 pairs, train.py's GPU defaults: bf16, fused AdamW, regional compile, transformer:0.25
           checkpointing, cuDNN attention)
  raw      python -m bench.speed train: train.py with its defaults on a manifest of 1024² JPEG
           pairs (decoding, VAE, text encoders and E5's CLIP every step)
  cached   the same on a cache of those pairs (python -m tools.build_cache, built first, untimed)

sd15/sdxl have random weights (--pretrained random: no download). Every run's row and a last
summary row, {"mode": "e2e", ...} with the medians, their ratios and the peak memory over the
three, are appended to --out with the GPU's name and the torch and diffusers versions.

    python -m bench.e2e                         # on the GPU (bash bench/gpu_e2e.sh wraps it)
    python -m bench.e2e --dry                   # the same steps on the CPU with tiny-xl, in seconds
    python -m bench.e2e --profile               # then the raw run once more under bench/profile.py
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import speed
from plumbing import checks, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("bench", "raw", "cached")


def settings(dry):
    """The model, data size and flags of each run: the GPU check, or its CPU dry run."""
    if dry:
        return dict(model="tiny-xl", pairs=24, image_size=64, steps=4, device=["--device", "cpu"],
                    bench=["--batch_size", "4", "--steps", "2", "--warmup", "1"],
                    encoders=["--embed_model", "tiny"], cache=["--batch_size", "8"])
    return dict(model="sdxl", pairs=64, image_size=1024, steps=14, device=[],
                bench=["--resolution", "1024", "--batch_size", "4", "--mixed_precision", "bf16", "--optimizer",
                       "adamw_fused", "--compile", "regional", "--checkpointing", "transformer:0.25", "--sdpa_backend",
                       "cudnn", "--steps", "6", "--warmup", "3"],
                encoders=["--pretrained", "random"], cache=["--batch_size", "4", "--mixed_precision", "bf16"])


def commands(s, tmp, manifest):
    """The argv of each run (after `python -m`)."""
    train = ["bench.speed", "train", "--model", s["model"], *s["encoders"], "--batch_size", "4", "--grad_accum", "1",
             "--max_steps", str(s["steps"]), "--overwrite", "--no_progress", *s["device"]]
    return {"bench": ["bench.speed", "--json", "--model", s["model"], *s["bench"], *s["device"]],
            "raw": train + ["--data", manifest, "--out_dir", os.path.join(tmp, "raw")],
            "cached": train + ["--data", f"cache:{os.path.join(tmp, 'cache')}", "--out_dir", os.path.join(tmp, "cached")]}


def environment():
    import diffusers
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__}


def run(argv, timeout):
    """python -m ARGV from the repository root -> (its last JSON row or None, return code, seconds, output tail)."""
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), 124
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and line.rstrip().endswith("}")]
    return (rows[-1] if rows else None), rc, round(time.time() - t0, 1), out[-2000:]


def rate(name, row):
    return None if row is None else row.get("pairs_per_s" if name == "bench" else "median_pairs_per_s")


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="the same steps on the CPU with tiny-xl and 64² JPEGs")
    p.add_argument("--repeat", type=int, default=None, help="bench, raw, cached in turn, this many times (medians; "
                                                            "default 2, --dry 1)")
    p.add_argument("--out", default=None, help="append the rows here (default: results/e2e_gpu.jsonl; --dry: "
                                               "e2e-dry.jsonl in the temporary folder)")
    p.add_argument("--tmp", default=None, help="folder for the pairs, the cache and the runs: empty (or created), or "
                                               "an earlier one of this script's with --overwrite (default: a new one)")
    p.add_argument("--overwrite", action="store_true", help="--tmp holds an earlier run of this script: replace it")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--profile", action="store_true", help="then once more the raw run, profiled (python -m bench.speed "
                                                          "profile): the share of each part of its step")
    args = p.parse_args(argv)
    checks.plain_numbers(p, args, positive=("repeat", "timeout"))
    problem = args.out is not None and files.rows_file_problem(args.out, "--out")
    if problem:
        p.error(problem)
    if args.tmp:  # train.py's rule for a folder it writes: empty, or its own output (replaced with --overwrite)
        mine = ["pairs", "cache", "raw", "cached", "profile", "e2e-dry.jsonl"]
        problem = files.output_folder_problem(args.tmp, "--tmp", mine, lambda: [os.path.join(args.tmp, n) for n in mine],
                                              args.overwrite)
        if problem:
            raise SystemExit(problem)
    s = settings(args.dry)
    args.repeat = args.repeat or (1 if args.dry else 2)
    tmp = args.tmp or tempfile.mkdtemp(prefix="e2e-")
    os.makedirs(tmp, exist_ok=True)
    out = args.out or (os.path.join(tmp, "e2e-dry.jsonl") if args.dry else os.path.join(ROOT, "results", "e2e_gpu.jsonl"))
    env = environment()

    def write(row):
        row = dict(row, **env)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    t0 = time.time()
    manifest = speed.fake_manifest(os.path.join(tmp, "pairs"), s["pairs"], s["image_size"])
    print(f"# {s['pairs']} JPEG pairs of {s['image_size']}² in {time.time() - t0:.1f} s: {manifest}", flush=True)
    cache_row, rc, secs, tail = run(["tools.build_cache", "--model", s["model"], *s["encoders"], "--data", manifest,
                                     "--out", os.path.join(tmp, "cache"), *s["cache"], *s["device"]], args.timeout)
    write({"mode": "e2e-run", "run": "build_cache", "rc": rc, "wall_s": secs})
    print(f"# cache built in {secs} s (rc {rc})", flush=True)
    if rc:
        print(tail, file=sys.stderr)
    rates, peaks, workers = {name: [] for name in RUNS}, {name: [] for name in RUNS}, None
    for r in range(args.repeat):  # interleaved: a drift in the machine's speed hits all three alike
        for name, argv_ in commands(s, tmp, manifest).items():
            row, rc, secs, tail = run(argv_, args.timeout)
            rates[name].append(rate(name, row))
            peaks[name].append((row or {}).get("peak_mem_GiB"))
            if name == "raw" and os.path.exists(os.path.join(tmp, "raw", "args.json")):
                with open(os.path.join(tmp, "raw", "args.json")) as f:
                    workers = json.load(f).get("num_workers")
            write({"mode": "e2e-run", "run": name, "repeat": r, "rc": rc, "wall_s": secs, "pairs_per_s": rates[name][-1],
                   "peak_mem_GiB": peaks[name][-1], "argv": " ".join(argv_), "row": row})
            print(f"# {name} {r + 1}/{args.repeat}: {rates[name][-1]} pairs/s, peak {peaks[name][-1]} GiB, rc {rc}, "
                  f"{secs} s", flush=True)
            if rc or row is None:
                print(tail, file=sys.stderr)
    if args.profile:
        argv_ = ["bench.speed", "profile"] + commands(s, tmp, manifest)["raw"][2:-2] + ["--out_dir", os.path.join(tmp, "profile")]
        row, rc, secs, tail = run(argv_, args.timeout)
        write(dict(row or {"mode": "profile", "argv": " ".join(argv_)}, rc=rc, wall_s=secs))
        print(f"# profile of the raw run (ms per step): {(row or {}).get('ms')}, rc {rc}", flush=True)
        if rc or row is None:
            print(tail, file=sys.stderr)
    bench, raw, cached = (median(rates[name]) for name in RUNS)
    every_peak = [v for name in RUNS for v in peaks[name] if v is not None]
    summary = write({"mode": "e2e", "model": s["model"], "bench_pairs_per_s": bench, "raw_pairs_per_s": raw,
                     "cached_pairs_per_s": cached, "raw_over_bench": ratio(raw, bench),
                     "cached_over_bench": ratio(cached, bench), "cached_over_raw": ratio(cached, raw),
                     "peak_mem_GiB": max(every_peak) if every_peak else None,
                     "peak_mem_GiB_each": {name: max([v for v in peaks[name] if v is not None], default=None)
                                           for name in RUNS},
                     "runs": rates, "repeat": args.repeat, "train_steps": s["steps"], "pairs": s["pairs"],
                     "image_size": s["image_size"], "raw_num_workers": workers, "dry": args.dry})
    print(f"bench {bench} pairs/s, train.py raw {raw} ({summary['raw_over_bench']}x bench), cached {cached} "
          f"({summary['cached_over_bench']}x bench, {summary['cached_over_raw']}x raw); peak "
          f"{summary['peak_mem_GiB']} GiB; {s['model']} on {env['gpu']}, {args.repeat} alternations; rows in {out}",
          flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
