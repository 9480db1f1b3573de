"""
Where the time of a train.py step goes: train.py itself, run with a timer around each part of
the step, then one table and one JSON row of milliseconds per step and shares.

    python -m bench.speed profile --model tiny-xl --max_steps 6 --out_dir /tmp/p --overwrite   # CPU
    python -m bench.speed profile --model sdxl --pretrained random --data pairs.jsonl --batch_size 4 \
        --max_steps 14 --out_dir /tmp/p --overwrite --profile_out results/profile.jsonl        # GPU

The parts: data_wait (next batch from data.stream_batches, the copy to the GPU included),
vae_encode (model.encode_images), text_encoders (model.encode_prompts), e5_clip
(model.clip_features), cached_inputs (model.cached_inputs, --data cache:DIR), policy_fwd and
reference_fwd (model.predict_noise with and without grad), policy_bwd (the backward),
optimizer (train.clip_gradients and the optimizer's step), and other: the rest of the step
(noise, the loss, logging, checkpoints). The timers wrap those functions from outside while the
run lasts and are removed after it: train.py runs unchanged when it is not profiled.

Each part starts and ends with torch.cuda.synchronize() when CUDA is in use (time.perf_counter
alone on the CPU), so a part's time is its own GPU work; nothing overlaps while profiling, and a
profiled step is at least as long as an unprofiled one (compare pairs_per_s with train.py's own).
The first --profile_warmup steps (compilation, cuDNN's first calls) are left out. Validation
sampling (--validation_prompts) would count as reference_fwd: leave it off here.
"""
import json
import os
import sys
import time

import torch

import data
import model as M
import train
from plumbing import files

PARTS = ("data_wait", "vae_encode", "text_encoders", "e5_clip", "cached_inputs", "policy_fwd", "policy_bwd",
         "reference_fwd", "optimizer", "other")


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepParts:
    """Seconds per part per optimizer step. A part called inside another (none today) counts in
    the outer one only."""

    def __init__(self):
        self.steps, self.now, self.depth, self.start = [], dict.fromkeys(PARTS, 0.0), 0, None

    def timed(self, part, fn):
        def run(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            sync()
            t0 = time.perf_counter()
            if self.start is None:
                self.start = t0  # the first step starts at its first batch
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                sync()
                self.now[part] += time.perf_counter() - t0
        return run

    def step_done(self):
        """After each optimizer step (train.Reporter.step): close the step."""
        sync()
        t = time.perf_counter()
        total = t - self.start
        self.now["other"] = total - sum(v for k, v in self.now.items() if k != "other")
        self.steps.append(dict(self.now, step=total))
        self.now, self.start = dict.fromkeys(PARTS, 0.0), t


def patches(parts):
    """(object, attribute, timed replacement) for each function that train.py calls by module attribute."""
    predict = M.predict_noise

    def predict_noise(*args, **kwargs):  # the policy's forward runs with grad, the reference's without
        return parts.timed("policy_fwd" if torch.is_grad_enabled() else "reference_fwd", predict)(*args, **kwargs)

    make_optimizer = M.make_optimizer

    def make_timed_optimizer(*args, **kwargs):
        opt = make_optimizer(*args, **kwargs)
        opt.step = parts.timed("optimizer", opt.step)  # (an instance attribute: GradScaler.step calls it)
        return opt

    stream_batches = data.stream_batches

    def timed_stream(*args, **kwargs):
        batches = stream_batches(*args, **kwargs)
        wait = parts.timed("data_wait", next)
        while True:
            yield wait(batches)

    reporter_step_ = train.Reporter.step

    def reporter_step(self, record):
        reporter_step_(self, record)
        parts.step_done()

    return [(M, "encode_images", parts.timed("vae_encode", M.encode_images)),
            (M, "encode_prompts", parts.timed("text_encoders", M.encode_prompts)),
            (M, "clip_features", parts.timed("e5_clip", M.clip_features)),
            (M, "cached_inputs", parts.timed("cached_inputs", M.cached_inputs)),
            (M, "predict_noise", predict_noise),
            (M, "make_optimizer", make_timed_optimizer),
            (train, "clip_gradients", parts.timed("optimizer", train.clip_gradients)),
            (data, "stream_batches", timed_stream),
            (train.Reporter, "step", reporter_step),
            (torch.Tensor, "backward", parts.timed("policy_bwd", torch.Tensor.backward))]


def profile(argv, warmup=2):
    """train.main(argv) with the part timers on -> (StepParts, the run's resolved args)."""
    parts = StepParts()
    undo = []
    try:
        for obj, name, fn in patches(parts):
            undo.append((obj, name, obj.__dict__[name]))
            setattr(obj, name, fn)
        train.main(argv)
    finally:
        for obj, name, fn in reversed(undo):
            setattr(obj, name, fn)
    parts.steps = parts.steps[warmup:]
    return parts


def summary(parts, argv, warmup):
    """One JSON row: mean milliseconds per step of each part, its share of the step, pairs/s."""
    args = train.parse_args(argv)
    resolved = {}
    if os.path.exists(os.path.join(args.out_dir, "args.json")):
        with open(os.path.join(args.out_dir, "args.json")) as f:
            resolved = json.load(f)
    n = len(parts.steps)
    if not n:
        raise SystemExit(f"error: profile: no step after the {warmup} warm-up steps; raise --max_steps")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mean = {k: sum(s[k] for s in parts.steps) / n for k in (*PARTS, "step")}
    row = {"mode": "profile", "argv": " ".join(argv), "steps_profiled": n, "warmup_steps": warmup,
           "ms_per_step": round(1e3 * mean["step"], 2),
           "pairs_per_s": round(args.batch_size * args.grad_accum * world / mean["step"], 3),
           "ms": {k: round(1e3 * mean[k], 2) for k in PARTS},
           "share": {k: round(mean[k] / mean["step"], 4) for k in PARTS},
           "num_workers": resolved.get("num_workers"), "compile": resolved.get("compile"),
           "mixed_precision": resolved.get("mixed_precision"), "torch": torch.__version__}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        row["gpu"] = torch.cuda.get_device_name()
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv):
    """python -m bench.speed profile [--profile_warmup N] [--profile_out FILE] [train.py flags]"""
    argv, warmup, out = list(argv), 2, None
    for flag in ("--profile_warmup", "--profile_out"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--profile_warmup":
                if not (value.isdigit() and int(value) <= 10 ** 6):
                    raise SystemExit(f"error: --profile_warmup takes a number of steps from 0 to 1000000, not {value!r}")
                warmup = int(value)
            else:
                out = value
                problem = files.rows_file_problem(out, "--profile_out")
                if problem:
                    raise SystemExit(f"error: {problem}")
    steps = train.parse_args(argv).max_steps  # (train.py's flags, checked before anything loads)
    if steps is not None and steps <= warmup:
        raise SystemExit(f"error: profile: --max_steps {steps} leaves no step after the {warmup} warm-up steps "
                         f"(--profile_warmup): raise --max_steps")
    parts = profile(argv, warmup)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    row = summary(parts, argv, warmup)
    print(f"profile of {row['steps_profiled']} steps after {warmup} warm-up steps: {row['ms_per_step']:.1f} ms/step, "
          f"{row['pairs_per_s']:.2f} pairs/s (every part synchronized: nothing overlaps)")
    for k in PARTS:
        print(f"  {k:<14} {row['ms'][k]:9.2f} ms  {100 * row['share'][k]:5.1f}%")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
