"""
Behaviour check for refactors: fixed-seed training runs whose final weights and metrics must be
bit-identical before and after a change to the code.

    python -m tools.same_runs record before.json     # on the old code
    python -m tools.same_runs check before.json      # on the new code: exit 1 on any difference
    python -m tools.same_runs check before.json --new_metrics contrast_acc,offdiag_loss_share
                                                     # a change that adds logged figures: the weights and
                                                     # every figure the record knew must still be identical

Each of the nine runs trains 20 steps on a tiny preset (CPU, one thread per process) and is
summarised by the SHA-256 of the tensors (names, dtypes, shapes, bytes) of every .safetensors file
of its final unet/ or lora/ folder and of its metrics.jsonl with the timing column (pairs_per_s)
removed. A refactor that changes nothing changes none of these.

Exact on one machine only: another CPU (its vector units, its BLAS kernels) rounds differently,
so a record made elsewhere can differ in every run without any code change. A record names the
machine that made it; `check` says so when the machines differ, and the comparison that counts
is a record and a check made on the same machine.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

from plumbing import files, speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--max_steps", "20", "--batch_size", "4", "--no_progress", "--num_items", "256"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RUNS = {  # name: (command before train.py's flags, flags)
    "tiny-rpo": ([], ["--model", "tiny", "--loss", "rpo", "--caption_dropout", "0.2", "--random_flip",
                      "--random_crop", "--grad_accum", "2", "--warmup_steps", "5"]),
    "tiny-rpo-inside-text": ([], ["--model", "tiny", "--loss", "rpo", "--rpo_weighting", "inside", "--embed", "text",
                                  "--timesteps", "pair", "--tau", "0.1"]),
    "tiny-dpo": ([], ["--model", "tiny", "--loss", "dpo"]),
    "tiny-sft": ([], ["--model", "tiny", "--loss", "sft", "--data", "toy-base"]),
    "tiny-xl-rpo": ([], ["--model", "tiny-xl", "--loss", "rpo", "--random_flip"]),
    "tiny-sd-cache-rpo": ([], ["--model", "tiny-sd", "--loss", "rpo", "--data", "cache:{cache}", "--caption_dropout", "0.2"]),
    "tiny-lora-rpo": ([], ["--model", "tiny", "--loss", "rpo", "--lora_rank", "4"]),
    "ddp-global-contrast": (TORCHRUN, ["--model", "tiny", "--loss", "rpo", "--device", "cpu", "--global_contrast",
                                       "--caption_dropout", "0.2"]),
    "fsdp": (TORCHRUN, ["--model", "tiny-xl", "--loss", "rpo", "--device", "cpu", "--fsdp", "--grad_accum", "2"]),
}


def digest(path):
    """SHA-256 of a safetensors file's tensors (names, dtypes, shapes, bytes), not of the file:
    the header's metadata (and its key order) may differ between two saves of the same weights."""
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def summarise(out, new_metrics=()):
    result = {}
    for folder in ("unet", "lora"):
        d = os.path.join(out, folder)
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if name.endswith(".safetensors"):  # the weights; config.json records the diffusers version
                    result[f"{folder}/{name}"] = digest(os.path.join(d, name))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    for line in lines:
        for key in ("pairs_per_s", *new_metrics):
            line.pop(key, None)
    result["metrics"] = hashlib.sha256(json.dumps(lines, sort_keys=True).encode()).hexdigest()
    result["final_loss"] = lines[-1]["loss"]
    return result


def run_all(work, new_metrics=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cache = os.path.join(work, "cache")
    subprocess.run([sys.executable, "-m", "tools.build_cache", "--model", "tiny-sd", "--data", "toy", "--num_items", "64",
                    "--out", cache, "--dtype", "fp32"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    results = {}
    for name, (launcher, flags) in RUNS.items():
        out = os.path.join(work, name)
        flags = [f.format(cache=cache) for f in flags]
        cmd = (launcher or [sys.executable]) + ["train.py"] + STEPS + flags + ["--out_dir", out]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: run {name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        results[name] = summarise(out, new_metrics)
        print(f"{name}: final loss {results[name]['final_loss']:.6f}", flush=True)
    return results


def read_record(path):
    """(machine, runs) of a record `record` wrote ({"machine", "runs": {run: {key: value}}}; older
    records: the runs only), or one error line."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {path}: cannot be read as a record ({type(err).__name__}: "
                         f"{str(getattr(err, 'strerror', None) or err).splitlines()[0][:200]})")
    runs = record.get("runs", record) if isinstance(record, dict) else None
    if not (isinstance(runs, dict) and runs and all(isinstance(r, dict) for r in runs.values())):
        raise SystemExit(f"error: {path}: not a record of python -m tools.same_runs record")
    return record.get("machine"), runs


def main():
    argv = sys.argv[1:]
    if argv in ([], ["-h"], ["--help"]):
        return print(__doc__)
    new = argv[argv.index("--new_metrics") + 1].split(",") if "--new_metrics" in argv[:-1] else []
    argv = [a for i, a in enumerate(argv) if a != "--new_metrics" and (i == 0 or argv[i - 1] != "--new_metrics")]
    if len(argv) != 2 or argv[0] not in ("record", "check") or (new and argv[0] != "check"):
        sys.exit("error: usage: python -m tools.same_runs record FILE | check FILE [--new_metrics A,B] (--help says more)")
    mode, path = argv
    # the file first: the runs take minutes, and a record that cannot be read or written would waste them
    if mode == "check":
        made_on, before = read_record(path)
    else:
        problem = files.file_to_write_problem(path, "record")
        if not problem and os.path.lexists(path):
            try:
                read_record(path)  # (an earlier record may be replaced; any other file is the user's)
            except SystemExit:
                problem = f"record {path} exists and is not an earlier record: choose another name"
        if problem:
            sys.exit(f"error: {problem}")
    with tempfile.TemporaryDirectory() as work:
        results = run_all(work, new)
    if mode == "record":
        files.write_atomic(path, json.dumps({"machine": speed.machine(), "runs": results}, indent=1))
        print(f"recorded {len(results)} runs in {path}")
        return
    if made_on != speed.machine():
        print(f"note: the record was made on {made_on or 'an unnamed machine'}, this is {speed.machine()}: "
              f"differences can be floating-point rounding, not code")
    bad = [f"{name}: {key}" for name in before for key in before[name]
           if results.get(name, {}).get(key) != before[name][key]]
    print("identical: every run's weights and metrics" if not bad else "DIFFERENT:\n  " + "\n  ".join(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
