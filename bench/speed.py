"""
Benchmark one Diffusion-RPO training step: time, throughput, peak memory, FLOPs and MFU.

    python -m bench.speed --model tiny --loss rpo --batch_size 8                       # CPU
    python -m bench.speed --model sdxl --init random --loss rpo --batch_size 4 --resolution 1024 \
                    --mixed_precision bf16 --gradient_checkpointing --optimizer adamw_fused
    python -m bench.speed --model sdxl --batch_size 4 --preset dpo-reference          # + the official DPO setup
    python -m bench.speed --model sdxl --batch_size 4 --mixed_precision bf16 --lora_rank 8  # LoRA: bf16 base, fp32 adapter
    python -m bench.speed --model tiny-sd --data toy --steps 30                        # raw images vs data.py's cache
    python -m bench.speed train [train.py flags]      # train.py's own pairs/s and peak memory, one JSON row
    python -m bench.speed profile [train.py flags]    # the share of each part of a train.py step (bench/profile.py)
    python -m bench.speed --loss rpo,dpo,rpo_topk --topk 1   # any other flag is train.py's (an objective's setting)

The step is train.micro_batch_loss (what train.py runs) plus backward and the optimizer: policy
forward+backward on [winners; losers], reference forward, E1/E3/E7 (with --lora_rank the
reference forward is the same UNet with its adapters off: model.reference_unet). UNets are built from their
architecture (plumbing.random_weights.ARCHITECTURES) with random weights and fed random latents and text states
of the right shapes: no download, and no VAE/text-encoder/CLIP time (train.py can skip those
with cached data). FLOPs are counted with torch.utils.flop_counter on one eager step without
gradient checkpointing (model FLOPs: recomputation is not useful work), and MFU divides them by
the step time and the GPU's dense bf16 peak.
"""
import argparse
import gc
import json
import time

import torch

import loss as L
import model as M
import train
from tools import build_cache
from plumbing import checks, files, hub, parallel, random_weights, speed
from plumbing.images import render_toy, toy_prompts

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
COMPILED_SDPA = None  # the attention backend of the graphs Dynamo holds (run: reset when it changes)
FLOPS_PER_PAIR = {}  # (model, init, loss, resolution, lora_rank) -> model FLOPs of one pair's step
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2, "RTX 3090": 71.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=list(M.PRESETS))
    p.add_argument("--init", default="random", help="random (architecture only) or a saved unet/ folder")
    p.add_argument("--loss", default="rpo", help="rpo, dpo or sft; a comma list (rpo,dpo) runs each in this process")
    p.add_argument("--repeat", type=int, default=1, help="with a loss list: alternate the losses this many times "
                                                          "and report each one's median (fairer on a noisy machine)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    p.add_argument("--resolution", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient_checkpointing", action="store_true", help="= --checkpointing all")
    p.add_argument("--checkpointing", default=None, metavar="{" + ",".join(speed.CHECKPOINTING) + ",transformer:F}",
                   help="which blocks recompute their activations in backward (plumbing.speed.apply_checkpointing)")
    p.add_argument("--compile", nargs="?", const="full", default="none", choices=["none", "regional", "full"],
                   help="torch.compile the policy and reference UNets: full (bare --compile) or each block "
                        "(plumbing.speed.compile_blocks); compile time is reported apart from the step time")
    p.add_argument("--sdpa_backend", default="default", choices=speed.SDPA_BACKENDS,
                   help="attention kernel (plumbing.speed.set_sdpa_backend); a shape it cannot take fails the row")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused", "adafactor", "adamw8bit"])
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="LoRA of this rank on q/k/v/out (needs peft): frozen base in the compute dtype, fp32 adapter, "
                        "no reference copy; 0: full fine-tune")
    p.add_argument("--preset", default=None, choices=["dpo-reference"],
                   help="also run the official Diffusion-DPO SDXL setup and print the speed ratio")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line per configuration")
    p.add_argument("--data", default=None, help="instead: train.py's pairs/s on this --data spec, raw vs cached "
                                                "(the cache is built first, untimed); fake-pickapic: 512² JPEG "
                                                "pairs in Pick-a-Pic's parquet layout, made here")
    p.add_argument("--num_workers", default="0", help="--data: DataLoader workers for both runs; a comma list "
                                                           "(0,4) compares raw and cached once per value")
    p.add_argument("--pretrained", default=None, help="--data with sd15/sdxl: hub id or local diffusers folder, or "
                                                      "'random': their architectures with random weights (no download)")
    p.add_argument("--embed_model", default=None, help="--data: CLIP for E5 (train.py's default when not given)")
    p.add_argument("--grid", default=None,
                   help="a JSON list of flag overrides, e.g. '[{\"compile\": \"regional\"}, {\"batch_size\": 8}]': "
                        "each configuration in turn in this one process (one start-up, FLOPs counted once per shape); "
                        "a failure (OOM, ...) becomes an error row and the next one runs")
    p.add_argument("--time_budget", type=float, default=0, help="--grid: seconds; configurations that would start "
                                                                 "after it are skipped (0: no limit)")
    p.add_argument("--out", default=None, help="also append each JSON row to this file")
    p.add_argument("--label", default=None, help="a name stored in each row")
    args, args.train_flags = p.parse_known_args(argv)
    checks.plain_numbers(p, args, positive=("repeat", "batch_size", "resolution", "steps"),
                         non_negative=("warmup", "time_budget", "lora_rank"))
    problem = hub.pickled_flags_problem(args, ("--init", "--pretrained", "--embed_model"))  # (never unpickled)
    problem = problem or (args.out is not None and files.rows_file_problem(args.out, "--out"))
    if problem:
        p.error(problem.removeprefix("error: "))
    try:
        args.workers = [int(w) for w in str(args.num_workers).split(",")]
        assert all(0 <= w <= 1024 for w in args.workers)
    except (ValueError, AssertionError):
        p.error(f"--num_workers takes a comma list of worker counts from 0 to 1024, not {args.num_workers!r}")
    for name in args.loss.split(","):  # any other flag is train.py's (an objective's setting, say): checked by it
        if name not in L.OBJECTIVES:
            p.error(f"--loss takes a comma list of {', '.join(L.OBJECTIVES)}, not {args.loss!r}")
        try:
            train.parse_args(["--loss", name, *args.train_flags])
        except SystemExit:
            p.error(f"neither bench/speed.py nor train.py takes {' '.join(args.train_flags)!r} (see above)")
    if args.gradient_checkpointing and args.checkpointing is None:
        args.checkpointing = "all"
    args.checkpointing = args.checkpointing or "none"
    args.gradient_checkpointing = args.checkpointing != "none"
    return args


def fake_batch(m, name, B, R, generator):
    """An already-encoded batch for train.micro_batch_loss: random [winners; losers] latents,
    text conditioning and E5 features (CLIP text (B, 64), image (2B, 64)) of the right shapes."""
    unet = m.unet
    factor = 8 if name in ("sd15", "sdxl") else (2 if m.vae is not None else 1)
    latents = torch.randn(2 * B, unet.config.in_channels, R // factor, R // factor, generator=generator).to(m.device)
    if name in ("sd15", "sdxl"):
        shape = random_weights.TEXT_SHAPES[name]
        hidden = torch.randn(B, shape["tokens"], shape["hidden"], generator=generator).repeat(2, 1, 1)
        cond = {"encoder_hidden_states": hidden.to(m.device, m.dtype)}
        if m.xl:
            time_ids = torch.tensor([[R, R, 0, 0, R, R]] * 2 * B, dtype=torch.float32)
            cond["added_cond_kwargs"] = {"text_embeds": torch.randn(B, shape["pooled"], generator=generator).repeat(2, 1).to(m.device, m.dtype),
                                         "time_ids": time_ids.to(m.device, m.dtype)}
    else:
        cond = M.encode_prompts(m, ["a red circle on a black background"] * B, repeat=2)
    features = (torch.randn(B, 64, generator=generator).to(m.device), torch.randn(2 * B, 64, generator=generator).to(m.device))
    return {"prompt": [""] * B, "latents": latents, "cond": cond, "features": features}


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def normalise(cfg):
    """The older spellings too: gradient_checkpointing=True means checkpointing "all", compile
    True/False means "full"/"none"."""
    cfg = dict(cfg)
    if not cfg.get("checkpointing"):
        cfg["checkpointing"] = "all" if cfg.get("gradient_checkpointing") else "none"
    cfg["gradient_checkpointing"] = cfg["checkpointing"] != "none"
    compile_ = cfg.get("compile", "none")
    cfg["compile"] = {True: "full", False: "none", None: "none"}.get(compile_, compile_)
    cfg.setdefault("sdpa_backend", "default")
    return cfg


def run(cfg):
    """One configuration: build, warm up, time. Returns a dict of figures."""
    cfg = normalise(cfg)
    device = torch.device(cfg["device"])
    name, B = cfg["model"], cfg["batch_size"]
    random_real = name in ("sd15", "sdxl") and cfg["init"] == "random"  # the real architecture, random weights, UNet alone
    m = M.load_models(name, pretrained="random" if random_real else None,
                      init_unet=None if cfg["init"] == "random" else cfg["init"], device=str(device),
                      mixed_precision=cfg["mixed_precision"], gradient_checkpointing=False,
                      reference=cfg["loss"] != "sft", lora_rank=cfg.get("lora_rank", 0), encoders=not random_real)
    R = cfg["resolution"] or m.resolution
    if cfg.get("offload_reference") and m.ref_unet is not None:
        # The official Diffusion-DPO SDXL script's memory saver: the reference lives in CPU RAM and
        # each submodule is copied to the GPU for its forward, every step.
        try:
            from accelerate import cpu_offload
        except ImportError:
            raise SystemExit("error: --preset dpo-reference offloads with accelerate (pip install accelerate)")
        m.ref_unet = cpu_offload(m.ref_unet.to("cpu"), execution_device=device)
    if cfg["channels_last"]:
        speed.to_channels_last(m.unet, m.ref_unet)
    generator = torch.Generator().manual_seed(0)

    def batch_of(pairs):
        batch = fake_batch(m, name, pairs, R, generator)
        if cfg["loss"] == "sft":  # winners only
            batch["latents"] = batch["latents"][:pairs]
            batch["cond"] = {k: (v[:pairs] if torch.is_tensor(v) else {kk: vv[:pairs] for kk, vv in v.items()})
                             for k, v in batch["cond"].items()}
        return batch

    params = [p for p in m.unet.parameters() if p.requires_grad]
    optimizer = M.make_optimizer(cfg["optimizer"], params, lr=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["mixed_precision"] == "fp16")
    autocast = torch.autocast(device.type, dtype=m.dtype, enabled=cfg["mixed_precision"] != "no")

    # the objective's settings: train.py's defaults, or what the command line passed on to train.py
    flags = train.parse_args(["--loss", cfg["loss"], "--timesteps", "batch", *cfg.get("train_flags", [])])

    def step(batch):
        loss, _ = train.micro_batch_loss(m, batch, generator, flags, autocast=autocast)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    # Model FLOPs: one eager step on ONE pair without gradient checkpointing (recomputation is
    # not useful work), times B (a UNet's FLOPs are linear in the batch). One pair keeps the
    # un-checkpointed activations small enough for any GPU that runs the real batch. Counted
    # before any compile, checkpointing or attention-backend choice, and once per shape in a
    # process (--grid): the same model FLOPs for every lever.
    key = (name, cfg["init"], cfg["loss"], R, cfg.get("lora_rank", 0))
    if key not in FLOPS_PER_PAIR:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step(batch_of(1))
        FLOPS_PER_PAIR[key] = counter.get_total_flops()
    flops = FLOPS_PER_PAIR[key] * B
    speed.apply_checkpointing(m.unet, cfg["checkpointing"])
    if device.type == "cuda":
        speed.set_sdpa_backend(cfg["sdpa_backend"], fallback=False)
    if cfg["compile"] != "none":
        # The attention kernel is chosen while a graph is traced and baked into it, and Dynamo does
        # not guard on the SDPA switches: a cached graph would keep the last row's kernel.
        global COMPILED_SDPA
        if COMPILED_SDPA not in (None, cfg["sdpa_backend"]):
            from torch import _dynamo
            _dynamo.reset()
        COMPILED_SDPA = cfg["sdpa_backend"]
    speed.compile_unet(m.unet, cfg["compile"])  # in place, as train.py --compile does
    speed.compile_unet(m.ref_unet, cfg["compile"])
    batch = batch_of(B)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = []
    for _ in range(cfg["warmup"]):  # the first step(s) compile: their excess over a timed step is compile time
        t0 = time.perf_counter()
        step(batch)
        sync()
        warm.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step(batch)
    sync()
    seconds = (time.perf_counter() - t0) / cfg["steps"]
    if device.type == "cuda":
        speed.set_sdpa_backend("default")
    result = dict(cfg, resolution=R, unet_params_M=round(M.unet_size(m.unet) / 1e6, 1),
                  trainable_params_M=round(sum(p.numel() for p in params) / 1e6, 3), ms_per_step=round(1e3 * seconds, 2),
                  pairs_per_s=round(B / seconds, 3), flops_per_step=flops, tflops_per_step=round(flops / 1e12, 3),
                  achieved_tflops=round(flops / seconds / 1e12, 1), first_step_s=round(warm[0], 2) if warm else None,
                  compile_s=round(sum(warm) - len(warm) * seconds, 1) if cfg["compile"] != "none" and warm else 0.0)
    if device.type == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result["fits_80GB"] = torch.cuda.max_memory_allocated(device) <= 80e9
        result["gpu"] = torch.cuda.get_device_name(device)
        peak = peak_tflops(device)
        result["mfu"] = round(flops / seconds / (peak * 1e12), 4) if peak else None
    return result


def measure(cfg):
    """run() in a scope of its own, then free its models before the next configuration."""
    result = run(cfg)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def show(result, args):
    if getattr(args, "out", None):
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.json:
        print(json.dumps(result), flush=True)
        return
    if "error" in result:
        print(f"{result.get('model')} {result.get('loss')} B={result.get('batch_size')}: FAILED {result['error']}", flush=True)
        return
    flags = [k for k in ("channels_last", "offload_reference") if result.get(k)]
    flags += [f"{k}={result[k]}" for k in ("checkpointing", "compile", "sdpa_backend")
              if result.get(k) not in (None, "none", "default")]
    if result.get("lora_rank"):
        flags.append(f"lora_rank={result['lora_rank']} ({result['trainable_params_M']}M trainable)")
    line = (f"{result['model']} {result['loss']} B={result['batch_size']} {result['resolution']}px "
            f"{result['mixed_precision']} {result['optimizer']} {' '.join(flags)}: {result['ms_per_step']:.1f} ms/step, "
            f"{result['pairs_per_s']:.2f} pairs/s, {1e3 * result['tflops_per_step']:.1f} GFLOP/step")
    if result.get("compile_s"):
        line += f", compile {result['compile_s']:.0f} s"
    if "peak_mem_GiB" in result:
        line += f", peak {result['peak_mem_GiB']:.1f} GiB"
        if result.get("mfu") is not None:
            line += f", MFU {100 * result['mfu']:.1f}%"
    print(line, flush=True)


def fake_pairs(n, size=512):
    """n (prompt, JPEG bytes, JPEG bytes) of toy renders upscaled to size² with noise (quality 90),
    so that decoding costs what a photo's does."""
    import io

    import numpy as np
    from PIL import Image

    rng, prompts = np.random.default_rng(0), toy_prompts("all")
    for i in range(n):
        prompt, jpegs = prompts[i % len(prompts)], []
        for _ in range(2):
            img = np.kron(render_toy(prompt, size // 8, rng), np.ones((8, 8, 1), dtype=np.uint8))
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
        yield prompt, *jpegs


def fake_pickapic(folder, n, size=512):
    """n fake_pairs in Pick-a-Pic's columns, one parquet shard."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i, (prompt, jpg_0, jpg_1) in enumerate(fake_pairs(n, size)):
        rows["caption"].append(prompt)
        rows["jpg_0"].append(jpg_0)
        rows["jpg_1"].append(jpg_1)
        rows["label_0"].append(float(i % 2))
    pq.write_table(pa.table(rows), os.path.join(folder, "train-00000-of-00001.parquet"), row_group_size=64)
    return folder


def fake_manifest(folder, n, size=1024):
    """n fake_pairs as JPEG files and a pairs.jsonl manifest naming them; returns its path."""
    import os

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        for i, (prompt, winner, loser) in enumerate(fake_pairs(n, size)):
            for name, jpeg in ((f"{i}w.jpg", winner), (f"{i}l.jpg", loser)):
                with open(os.path.join(folder, name), "wb") as img:
                    img.write(jpeg)
            f.write(json.dumps({"prompt": prompt, "winner": f"{i}w.jpg", "loser": f"{i}l.jpg"}) + "\n")
    return os.path.join(folder, "pairs.jsonl")


def bench_data(args, device):
    """--data DATA: train.py end to end, on the raw pairs of DATA (decoding, VAE, text encoders,
    E5's CLIP every step) and on a cache of the same pairs (data.py cache: none of those). A
    run's figure is the median of train.py's own per-step pairs/s after --warmup steps; with
    --repeat N the two alternate N times and the medians of the runs are reported.
    --pretrained random: sd15/sdxl with random weights (model.load_models). --num_workers may
    be a comma list (0,4): one raw/cached comparison per value, on the same cache."""
    import os
    import statistics
    import tempfile

    if os.environ.get("BENCH_TMP"):
        os.makedirs(os.environ["BENCH_TMP"], exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-data-", dir=os.environ.get("BENCH_TMP"))
    steps, n = args.steps + args.warmup, args.batch_size * (args.steps + args.warmup)
    if args.data == "fake-pickapic":  # Pick-a-Pic-like shards: 512x512 JPEG pairs (q 90), so decoding costs what it does
        args.data = f"pickapic:{fake_pickapic(f'{tmp}/pickapic', n)}"
    mp = args.mixed_precision if device.startswith("cuda") else "no"
    results = []
    t0 = time.time()
    try:
        index = build_cache.build_cache(args.model, args.data, f"{tmp}/cache", pretrained=args.pretrained,
                                        embed_model=args.embed_model, resolution=args.resolution, device=device,
                                        mixed_precision=mp, num_items=n, batch_size=args.batch_size,
                                        num_workers=args.workers[0], progress=False)
    except (ValueError, FileNotFoundError) as err:  # a --data that is not pairs read in order: one line
        raise SystemExit(f"error: --data {args.data}: {err}")
    cache_s = time.time() - t0
    print(f"cache: {index['num_pairs']} pairs in {cache_s:.1f} s ({tmp}/cache)", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for num_workers in args.workers:
        runs = {"raw": [], "cached": []}
        for name, spec in [("raw", args.data), ("cached", f"cache:{tmp}/cache")] * args.repeat:  # interleaved
            flags = ["--model", args.model, "--data", spec, "--loss", args.loss.split(",")[0], "--batch_size",
                     str(args.batch_size), "--max_steps", str(steps), "--num_items", str(n), "--out_dir",
                     f"{tmp}/{name}", "--overwrite", "--no_progress", "--num_workers", str(num_workers), "--device", device,
                     "--mixed_precision", mp] + (["--resolution", str(args.resolution)] if args.resolution else []) + (
                     ["--pretrained", args.pretrained] if args.pretrained else []) + (
                     ["--embed_model", args.embed_model] if args.embed_model else []) + (
                     ["--gradient_checkpointing"] if args.gradient_checkpointing else [])
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            train.main(flags)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with open(f"{tmp}/{name}/metrics.jsonl") as f:
                runs[name].append(statistics.median([json.loads(line)["pairs_per_s"] for line in f][args.warmup:]))
        rates = {name: statistics.median(r) for name, r in runs.items()}
        result = {"mode": "data", "model": args.model, "data": args.data, "pretrained": args.pretrained,
                  "loss": args.loss.split(",")[0], "batch_size": args.batch_size, "device": device,
                  "mixed_precision": mp, "num_workers": num_workers, "cache_build_s": round(cache_s, 1),
                  "raw_pairs_per_s": round(rates["raw"], 2), "cached_pairs_per_s": round(rates["cached"], 2),
                  "cached_over_raw": round(rates["cached"] / rates["raw"], 2), "runs": runs}
        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name()
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
        print(json.dumps(result) if args.json else
              f"{args.model} on {args.data}, {args.batch_size} pairs/step, {device}, {num_workers} workers: raw "
              f"{rates['raw']:.1f} pairs/s, cached {rates['cached']:.1f} pairs/s ({result['cached_over_raw']:.2f}x); "
              f"medians of {args.repeat} interleaved runs each: raw {[round(x, 1) for x in runs['raw']]}, "
              f"cached {[round(x, 1) for x in runs['cached']]}", flush=True)
        results.append(result)
    print(f"cache kept in {tmp}/cache", flush=True)
    return results[0] if len(results) == 1 else results


def run_grid(args, cfg):
    """--grid: each configuration (cfg plus one override dict) in this process, in order. An
    exception (CUDA out of memory, a kernel that refuses a shape, a compile failure) becomes a
    row with "error" and the grid goes on; --time_budget skips what would start after it."""
    import traceback
    t0, rows = time.time(), []
    for override in json.loads(args.grid):
        override = dict(override)
        if override.pop("from_best", False):
            # the fastest row so far that fit 80 GB with >= 4 pairs, its levers and batch size
            # (then this entry's other keys, e.g. "loss": "dpo")
            fit = [r for r in rows if "error" not in r and r.get("fits_80GB", True) and r["batch_size"] >= 4
                   and r["loss"] == "rpo"]
            if fit:
                best = max(fit, key=lambda r: r.get("mfu") or r["pairs_per_s"])
                lever_keys = ("compile", "checkpointing", "sdpa_backend", "channels_last", "batch_size")
                override = dict({k: best[k] for k in lever_keys}, **override)
        row_cfg = dict(cfg, **override)
        if row_cfg.get("gradient_checkpointing") and "checkpointing" not in override:
            row_cfg["checkpointing"] = "all"
        row_cfg["gradient_checkpointing"] = row_cfg["checkpointing"] != "none"
        if args.time_budget and time.time() - t0 > args.time_budget:
            result = dict(row_cfg, error=f"skipped: --time_budget {args.time_budget:.0f} s spent")
        else:
            try:
                result = measure(row_cfg)
            except Exception as err:  # noqa: BLE001 (the row records it; the grid goes on)
                traceback.print_exc()
                result = dict(row_cfg, error=f"{type(err).__name__}: {hub.first_line(err)}")
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if torch.cuda.is_available():
                result["gpu"] = torch.cuda.get_device_name()
        result["wall_s"] = round(time.time() - t0, 1)
        rows.append(result)
        show(result, args)
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = parallel.pick_device(args.device)
    if args.data:
        return bench_data(args, device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = {k: v for k, v in vars(args).items() if k not in ("preset", "json", "repeat", "grid", "time_budget", "out",
                                                             "data", "num_workers", "workers", "pretrained", "embed_model")}
    cfg["device"] = device
    if args.grid:
        return run_grid(args, cfg)
    losses = args.loss.split(",")
    results = {name: [] for name in losses}
    for _ in range(args.repeat):  # interleaved, so drifts in machine load hit every loss alike
        for name in losses:
            results[name].append(measure(dict(cfg, loss=name)))
            show(results[name][-1], args)
    median = {name: sorted(rs, key=lambda r: r["ms_per_step"])[len(rs) // 2] for name, rs in results.items()}
    ours = median[losses[0]]
    if len(losses) > 1:
        times = {name: r["ms_per_step"] for name, r in median.items()}
        summary = {"median_ms_per_step": times, f"{losses[0]}_over_{losses[1]}": round(times[losses[0]] / times[losses[1]], 3)}
        print(json.dumps(summary) if args.json else
              f"median ms/step: {times}; {losses[0]}/{losses[1]} step time = {summary[f'{losses[0]}_over_{losses[1]}']:.3f}",
              flush=True)
    if args.preset == "dpo-reference":
        # Diffusion-DPO's official SDXL setup: fp32 master weights under fp16 autocast, reference
        # UNet CPU-offloaded, Adafactor, gradient checkpointing, one pair per step.
        ref_cfg = dict(cfg, mixed_precision="fp16", optimizer="adafactor", gradient_checkpointing=True,
                       checkpointing="all", batch_size=1, compile="none", channels_last=False, sdpa_backend="default",
                       offload_reference=True, lora_rank=0)
        base = measure(ref_cfg)
        show(base, args)
        ratio = ours["pairs_per_s"] / base["pairs_per_s"]
        print(json.dumps({"speedup_vs_dpo_reference": round(ratio, 2)}) if args.json else
              f"speed-up over the Diffusion-DPO reference setup: {ratio:.2f}x pairs/s", flush=True)
    return ours


def train_main(argv):
    """bench/speed.py train [train.py flags]: train.py's main in this process (torchrun may launch it),
    with --pretrained random building sd15/sdxl from their architectures with random weights (no
    download). Prints one JSON row: train.py's own per-step figures (metrics.jsonl), the peak GPU
    memory, the world size and FSDP/DDP, the GPU."""
    import os
    import statistics
    args = train.parse_args(argv)
    t0 = time.time()
    train.main(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with open(os.path.join(args.out_dir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["pairs_per_s"] for line in f if line.strip()]
    row = {"mode": "train.py", "argv": " ".join(argv), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
           "parallel": "fsdp" if args.fsdp else ("ddp" if "RANK" in os.environ else "none"),
           "backend": ("nccl" if torch.cuda.is_available() else "gloo") if "RANK" in os.environ else None,
           "steps_logged": len(rates), "resumed": bool(args.resume), "wall_s": round(time.time() - t0, 1),
           "median_pairs_per_s": round(statistics.median(rates[1:] or rates), 2) if rates else None}
    if rates and torch.cuda.is_available():
        row["ms_per_step"] = round(1e3 * args.batch_size * args.grad_accum * row["world_size"] / row["median_pairs_per_s"], 1)
        row["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["train"]:
        train_main(sys.argv[2:])
    elif sys.argv[1:2] == ["profile"]:  # bench/profile.py: the share of each part of a train.py step
        from bench import profile
        profile.main(sys.argv[2:])
    else:
        main()
