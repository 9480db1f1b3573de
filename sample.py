"""
Sample images from the base or a trained UNet, with the stock diffusers samplers.

    python sample.py --model tiny --unet out/rpo-tiny/unet --prompts toy-test --seeds 0-3 --out out/samples-rpo
    python sample.py --model tiny --prompts toy-test --seeds 0-3 --out out/samples-base
    python sample.py --model sd15 --prompts PartiPrompts.tsv --seeds 0 --out out/parti-base  # or builtin, anime.json
    python sample.py --model tiny --unet out/rpo-tiny/unet --prompts toy-test --out out/samples-rpo \
                     --compare out/samples-base             # base | tuned, side by side, per (prompt, seed)
    python sample.py --model tiny --lora out/rpo-lora/lora --out out/samples-lora   # train.py --lora_rank's output
    python sample.py --model sd15 --unet mhdang/dpo-sd1.5-text2image-v1 --prompts builtin \
                     --negative_prompt "blurry, low quality" --out out/dpo-release   # a hub UNet (its unet/)

Writes OUT/0000_seed0.png ..., OUT/samples.jsonl (one line per image) and OUT/grid.png
(rows = prompts, columns = seeds; at most GRID_MAX images), each batch's as it ends, under a
progress bar; OUT is empty or an earlier output, continued with --resume or replaced with
--overwrite (plumbing/sample_out.py). Image (prompt, seed) starts from the same noise as the stock
StableDiffusion(XL)Pipeline given generator=torch.Generator("cpu").manual_seed(seed), and
follows the same sampling loop, so a saved unet/ gives the same image here and there
(tests/test_sample.py checks this to 1e-4), --negative_prompt included.

--unet is a local folder (a unet/ folder or its parent) or, when no such path exists, a hub id
(owner/name; its unet/ subfolder when it has one, as in a full pipeline repo; HF_HUB_OFFLINE=1
uses the local cache only). --lora merges train.py's OUT_DIR/lora into that UNet.
Mistakes (a truncated weights file, a LoRA or UNet of another preset, a prompts file that is not
UTF-8, an --out that is a file) end in one line `error: ...`, before any sampling.
"""
import argparse
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import model as M
from plumbing import files, hub, lora, parallel
from plumbing import sample_out as O
from plumbing.images import tensor_to_uint8, toy_prompts

SCHEDULERS = ("ddim", "euler", "dpm")
MAX_SEED, MAX_SEEDS = 2 ** 32 - 1, 10_000  # a seed is a uint32; a list longer than this is a typo
MAX_STEPS = 1000  # the schedulers' training timesteps: a sampler cannot take more steps
MAX_GUIDANCE = 100


def parse_seeds(text):
    """"0-3" (inclusive), "0,5,7", "2", or a mix ("0-3,9") -> list of ints; argparse type."""
    seeds = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if hi else int(lo)
            if lo < 0 or hi < lo:
                raise ValueError
            if hi > MAX_SEED or len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise argparse.ArgumentTypeError(f"bad seeds {text!r}: at most {MAX_SEEDS} seeds, each from 0 to "
                                                  f"{MAX_SEED}")
            seeds += range(lo, hi + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad seeds {text!r}: use e.g. 0-3, 0,5,7 or 2 (non-negative, ranges ascending)")
    if len(set(seeds)) != len(seeds):  # (prompt, seed) names an image: a repeat would be the same picture
        raise argparse.ArgumentTypeError(f"bad seeds {text!r}: a seed is repeated")
    return seeds


# A dozen varied prompts in the spirit of the paper's qualitative figures (people, animals, scenes,
# objects, text, styles) for a quick look at real models: `--prompts builtin`.
BUILTIN_PROMPTS = [
    "a portrait of an old fisherman with a grey beard, dramatic lighting",
    "a corgi wearing a red scarf sitting in a field of sunflowers",
    "a cozy wooden cabin in a snowy forest at night, warm light in the windows",
    "a bowl of ramen with a soft-boiled egg, studio photo",
    "an astronaut riding a horse on the moon",
    "a futuristic city skyline at sunset, flying cars, digital art",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a red sports car parked on a wet street in Tokyo at night",
    "a cat reading a book in a library, oil painting",
    "a glass teapot with blooming flowers inside, macro photo",
    'a wooden sign that says "open" hanging on a bakery door',
    "a mountain lake at dawn with mist over the water",
]


def _tsv_prompts(lines, spec):
    """PartiPrompts' format: a tab-separated header with a Prompt column, no quoting (a prompt's
    own quotes are kept as they are)."""
    header = lines[0].rstrip("\r\n").split("\t")
    if "Prompt" not in header:
        raise SystemExit(f"error: {spec}: a .tsv prompts file needs a Prompt column (PartiPrompts format)")
    col = header.index("Prompt")
    rows = [line.rstrip("\r\n").split("\t") for line in lines[1:]]
    return [r[col] for r in rows if len(r) > col]


def _json_prompts(text, spec):
    """HPSv2's benchmark prompts: a JSON list of strings (one style file, e.g. anime.json), or a
    dict style -> list (hpsv2.benchmark_prompts('all')), concatenated in the file's key order."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {spec}: not valid JSON ({err})")
    lists = list(obj.values()) if isinstance(obj, dict) else [obj]
    if not all(isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists):
        raise SystemExit(f"error: {spec}: expected a JSON list of prompt strings or a dict of such lists "
                         f"(HPSv2 benchmark format)")
    return [p for v in lists for p in v]


def read_prompts(spec):
    """Where prompts come from:
      builtin                      BUILTIN_PROMPTS (a dozen varied real-image prompts)
      toy-test / toy-train / toy-all   the procedural toy set's prompts (plumbing/images.py)
      FILE.json                    HPSv2 benchmark: a list of strings, or a dict of lists
      FILE (.tsv or any file whose first line is a tab-separated header with a Prompt column)
                                   PartiPrompts: the Prompt column
      FILE (anything else)         one prompt per line
      "a cat|a dog"                literal text, '|' between prompts
    Files must be UTF-8 (else one line naming file, line and column). Duplicates are dropped
    (first one kept): (prompt, seed) is the key of an image."""
    if spec == "builtin":
        prompts = list(BUILTIN_PROMPTS)
    elif spec in ("toy-test", "toy-train", "toy-all"):
        prompts = toy_prompts(spec[4:])
    elif files.text_file_problem(spec, "prompts file"):  # meant as a file: sampling its name would be a silent mistake
        raise SystemExit(f"error: {files.text_file_problem(spec, 'prompts file')}")
    elif os.path.isfile(spec):
        text = files.read_utf8(spec)
        if spec.lower().endswith(".json"):
            prompts = _json_prompts(text, spec)
        else:
            lines = io.StringIO(text, newline=None).readlines()  # \r\n and \r too, as open() reads them
            first = lines[0].rstrip("\r\n").split("\t") if lines else []
            if spec.lower().endswith(".tsv") or (len(first) > 1 and "Prompt" in first):
                prompts = _tsv_prompts(lines, spec) if lines else []
            else:
                prompts = lines
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [p.strip() for p in spec.split("|")]
    prompts = list(dict.fromkeys(p for p in prompts if p))
    if not prompts:
        raise SystemExit(f"error: no prompts in '{spec}'")
    return prompts


# ---------------------------------------------------------------------------------------
# The UNet to sample: --unet (local folder or hub id) and --lora, each checked before use.
# --unet loads with plumbing.hub.load_unet, the loader of train.py's --init.
def install_unet(m, unet, spec):
    """Put a loaded UNet in place of the preset's, prepared as load_models prepares its own (fp32 on
    the device), after checking that it fits the preset's text and latents: a
    UNet of another preset would otherwise fail deep inside the first step, or worse, run."""
    hub.fitting_unet(unet, m.unet, f"--unet {spec}", m.name)
    m.unet = None  # let the preset's UNet go before this one moves to the GPU: not two there at once
    m.unet = unet.to(m.device).float().train()


def make_scheduler(name, m):
    """A sampler over the *training* noise schedule (m.scheduler's betas, spacing, prediction
    type): the stock pipelines do the same when given Scheduler.from_config(m.scheduler.config)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    sched = cls.from_config(m.scheduler.config)
    if not m.xl:
        # StableDiffusionPipeline.__init__ rewrites two legacy SD1.x scheduler settings in place:
        # steps_offset -> 1 and clip_sample -> False (the SDXL pipeline does not). Real SD1.5
        # configs already say so; the tiny presets' DDPMScheduler leaves steps_offset at 0, and
        # with "leading" spacing (DDIM) that shifts every timestep by one (800..0 vs 801..1):
        # max |diff| 6e-3 against the stock pipeline before this was copied here.
        fix = {k: v for k, v in (("steps_offset", 1), ("clip_sample", False)) if k in sched.config}
        sched.register_to_config(**fix)
    return sched


def generate(m, prompts, seeds, steps=50, guidance=7.5, scheduler="ddim", batch_size=32, negative_prompt=None):
    """Images for every (prompt, seed), prompt-major (all seeds of prompts[0] first), as a float
    CPU tensor (len(prompts)·len(seeds), 3, H, W) in [-1, 1]. `m` is model.load_models(...).
    negative_prompt: the text of the unconditional half of classifier-free guidance, as the
    pipelines' negative_prompt (None: their default, see below)."""
    items = [(p, s) for p in prompts for s in seeds]
    return torch.cat([images for _, images in generate_batches(m, items, steps, guidance, scheduler, batch_size,
                                                               negative_prompt)])


@torch.no_grad()
def generate_batches(m, items, steps=50, guidance=7.5, scheduler="ddim", batch_size=32, negative_prompt=None):
    """generate's images batch by batch: yields (the batch's (prompt, seed) items, their images),
    so that a caller can write each batch before the next is sampled (sample.py's main)."""
    # Latent size as the stock pipelines compute it: 2^(levels-1) from the VAE config (not the
    # SD-typical 8, which is wrong for the 2-level tiny VAE); pixel space without a VAE.
    f = 2 ** (len(m.vae.config.block_out_channels) - 1) if m.vae is not None else 1
    shape = (1, m.unet.config.in_channels, m.resolution // f, m.resolution // f)
    cfg = guidance > 1  # the pipelines' rule: guidance <= 1 means no unconditional pass
    autocast = torch.autocast(m.device.type, dtype=m.dtype, enabled=m.dtype != torch.float32)
    # The unconditional input: without a negative prompt, training's (model.unconditional_text:
    # SD1.5 the encoding of "", SDXL zeros, as the stock pipelines), with the same time ids as the
    # conditional half. A negative prompt is encoded like a prompt, pooled embedding included; as
    # in the SDXL pipeline, only None (not "") means zeros there.
    neg = M.encode_prompts(m, [negative_prompt or ""], drop=torch.tensor([negative_prompt is None])) if cfg else None
    was_training = m.unet.training  # the toy experiment may call this mid-training: restore the mode
    m.unet.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            B = len(chunk)
            # A fresh scheduler per batch: Euler and DPM-Solver keep a step index / past outputs.
            sched = make_scheduler(scheduler, m)
            sched.set_timesteps(steps, device=m.device)
            if hasattr(sched, "set_begin_index"):  # as the SDXL pipeline does: start at timesteps[0]
                sched.set_begin_index(0)
            # Noise drawn per image from its own CPU generator: an image does not depend on the
            # batch it lands in or on the device, and equals the pipeline's draw at batch 1.
            latents = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for _, s in chunk])
            latents = latents.to(m.device) * sched.init_noise_sigma
            cond = M.encode_prompts(m, [p for p, _ in chunk])
            if cfg:  # one UNet call on [unconditional; conditional], the pipelines' order
                hidden, added = cond["encoder_hidden_states"], cond.get("added_cond_kwargs")
                uncond = neg["encoder_hidden_states"].expand(B, -1, -1)
                cond = {"encoder_hidden_states": torch.cat([uncond, hidden])}
                if m.xl:
                    pooled = added["text_embeds"]
                    un_pooled = neg["added_cond_kwargs"]["text_embeds"].expand(B, -1)
                    cond["added_cond_kwargs"] = {"text_embeds": torch.cat([un_pooled, pooled]),
                                                 "time_ids": added["time_ids"].repeat(2, 1)}
            for t in sched.timesteps:
                z = sched.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
                with autocast:
                    eps = M.predict_noise(m.unet, z, t, cond).float()
                if cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                latents = sched.step(eps, t, latents).prev_sample
            yield chunk, M.decode_latents(m, latents).cpu()
    finally:
        m.unet.train(was_training)


def make_grid(images_uint8, rows, cols, scale=1):
    """Row-major cells (uint8 HxWx3 arrays, all the same size; None = a black cell) -> one PIL
    image, upscaled by an integer `scale` with nearest neighbour so 16x16 pixels stay crisp."""
    cell = next(im for im in images_uint8 if im is not None)
    H, W = cell.shape[:2]
    canvas = np.zeros((rows * H, cols * W, 3), dtype=np.uint8)
    for k, im in enumerate(images_uint8):
        if im is not None:
            r, c = divmod(k, cols)
            canvas[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    grid = Image.fromarray(canvas)
    return grid.resize((cols * W * scale, rows * H * scale), Image.NEAREST) if scale != 1 else grid


def write_compare(base_dir, out_dir, prompts, seeds, images_uint8, scale, settings=None):
    """OUT/compare.png: per (prompt, seed) a cell with BASE_DIR's image left and this run's right;
    rows = prompts, cols = seeds (the layout of grid.png); cells with no match stay black.
    `settings` (steps, guidance, scheduler of this run): a difference from the base run is
    reported, since then the same seed no longer means the same sampling path. BASE_DIR is read
    as evaluate.py reads a folder: listed images only, inside it, each one an image."""
    records = files.read_index(base_dir)
    base = {(r["prompt"], r["seed"]): r for r in records}
    for k, v in (settings or {}).items():
        if records and records[0].get(k) != v:
            print(f"warning: --compare {base_dir} was sampled with {k} {records[0].get(k)}, this run with {v}")
    cells, missing = [], 0
    for k, key in enumerate((p, s) for p in prompts for s in seeds):
        if key not in base:
            cells.append(None)
            missing += 1
            continue
        base_img = np.asarray(files.open_rgb(base[key]["path"]))
        if base_img.shape != images_uint8[k].shape:
            raise SystemExit(f"error: --compare {base_dir}: {base[key]['file']} is "
                             f"{base_img.shape[1]}x{base_img.shape[0]}, this run's images are "
                             f"{images_uint8[k].shape[1]}x{images_uint8[k].shape[0]}")
        cells.append(np.concatenate([base_img, images_uint8[k]], axis=1))
    if missing == len(cells):
        raise SystemExit(f"error: --compare {base_dir}: none of this run's (prompt, seed) pairs is in its samples.jsonl")
    make_grid(cells, len(prompts), len(seeds), scale).save(os.path.join(out_dir, "compare.png"))
    print(f"compare: {len(cells) - missing} pairs (base left, tuned right) in {out_dir}/compare.png; "
          f"{missing} missing from {base_dir}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(M.PRESETS), help="preset (model.py)")
    p.add_argument("--pretrained", default=None, help="hub id or local diffusers folder for sd15/sdxl")
    p.add_argument("--unet", default=None,
                   help="a unet/ folder saved by train.py (or its parent), or a hub id when no such path exists "
                        "(owner/name, its unet/ subfolder if it has one, e.g. mhdang/dpo-sd1.5-text2image-v1); "
                        "default: the preset's")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="a LoRA saved by train.py --lora_rank (OUT_DIR/lora, diffusers format), merged into the UNet "
                        "(--unet's, or the preset's)")
    p.add_argument("--prompts", default="toy-test",
                   help="builtin, toy-test/toy-train/toy-all, a file (one per line; PartiPrompts .tsv; HPSv2 benchmark "
                        ".json), or text ('|' between)")
    p.add_argument("--seeds", type=parse_seeds, default="0-3", help="0-3, 0,5,7 or 2")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 5.0 for SDXL presets, else 7.5)")
    p.add_argument("--negative_prompt", default=None,
                   help="text for the unconditional half of guidance (needs --guidance > 1), as the pipelines' "
                        "negative_prompt; default: SD1.5 the empty prompt, SDXL zeros (as its pipeline)")
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS)
    p.add_argument("--out", default="out/samples",
                   help="output folder: empty (or created), or an earlier output of sample.py with --resume or --overwrite")
    p.add_argument("--resume", action="store_true",
                   help="continue --out's earlier output (same prompts, seeds and settings): images already there "
                        "are kept, the others sampled")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out's earlier output (its images, samples.jsonl, grid.png, compare.png are deleted)")
    p.add_argument("--compare", default=None, help="a folder from an earlier run (e.g. the base model): write compare.png")
    p.add_argument("--batch_size", type=int, default=32, help="images per UNet batch (results do not depend on it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--mixed_precision", default="no", choices=list(M.DTYPES))
    p.add_argument("--grid_scale", type=int, default=None,
                   help="nearest-neighbour upscale of grid/compare cells (default: 4 below 64 px, else 1)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size") + (("grid_scale",) if args.grid_scale is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    check_flags(p, args)
    return args


def check_flags(p, args):
    """Before anything loads: numbers in their ranges (guidance finite), a --prompts value that
    names a file names a readable one. One line each (argparse's exit 2)."""
    for name, top in (("steps", MAX_STEPS), ("batch_size", 2 ** 31 - 1), ("grid_scale", 64)):
        if getattr(args, name) is not None and getattr(args, name) > top:
            p.error(f"--{name} must be at most {top}, not {getattr(args, name)}")
    if args.guidance is not None and not 0 <= args.guidance <= MAX_GUIDANCE:  # (nan fails both)
        p.error(f"--guidance must be a finite number from 0 to {MAX_GUIDANCE}, not {args.guidance}")
    if args.prompts not in ("builtin", "toy-test", "toy-train", "toy-all"):
        problem = files.text_file_problem(args.prompts, "--prompts")
        if problem:
            p.error(problem)
    problem = hub.pickled_flags_problem(args, ("--unet", "--pretrained"))  # (never unpickled: one line now)
    if problem:
        p.error(problem.removeprefix("error: "))


def load_for_sampling(args):
    """The preset's models with --unet in place of its UNet and --lora merged into it. The inputs
    are checked first (the UNet loads to the CPU before the preset does): a bad one fails fast."""
    if args.lora:
        lora.check_lora(args.lora)
    unet = hub.load_unet(args.unet, "--unet") if args.unet else None
    device = parallel.pick_device(args.device)
    m = M.load_models(args.model, args.pretrained, device=device, mixed_precision=args.mixed_precision,
                      reference=False)
    if args.lora:
        # Merged on the CPU whatever the device (the preset's UNet comes back from it): one code
        # path, the one the tests run, as load_models(lora_dir=...) merges before moving too.
        unet = unet if unet is not None else m.unet.cpu()
        lora.check_lora(args.lora, unet)
        try:
            with hub.quiet():
                lora.fuse_lora(unet, args.lora)
        except Exception as err:  # SystemExit passes: fuse_lora's own messages are one line already
            raise SystemExit(f"error: --lora {args.lora}: cannot merge it ({type(err).__name__}: "
                             f"{hub.first_line(err)})")
    if unet is not None:
        install_unet(m, unet, args.unet or f"(the preset's, with --lora {args.lora})")
    return m


GRID_MAX = 1024  # grid.png and compare.png are made for at most this many images (one picture)


def write_samples(args, m, prompts, guidance):
    """Sample every (prompt, seed) not written yet, writing each image (whole: a rename) and then
    its samples.jsonl line as its batch ends, with a progress bar: a kill loses at most one batch,
    and --resume skips what is there. Returns the images (uint8, prompt-major) when there are at
    most GRID_MAX of them (grid.png, compare.png), else None: a large run holds none in memory."""
    from tqdm import tqdm
    items = [(p, s) for p in prompts for s in args.seeds]
    settings = dict(model=args.model, unet=args.unet, lora=args.lora, steps=args.steps, guidance=guidance,
                    scheduler=args.scheduler, negative_prompt=args.negative_prompt)
    done = O.read_done(args.out, items, settings) if args.resume else {}
    todo = [item for item in items if item not in done]
    keep = len(items) <= GRID_MAX
    kept = {}
    O.make_out(args)  # (--overwrite deletes the earlier output now, the models loaded)
    index = os.path.join(args.out, "samples.jsonl")
    # the index as --resume leaves it: the records of the images that are there, nothing cut short
    files.write_atomic(index, "".join(json.dumps(done[item]) + "\n" for item in items if item in done))
    if done:
        print(f"--resume: {len(done)} of {len(items)} images are in {args.out} already; sampling the other "
              f"{len(todo)}", file=sys.stderr)
    number = {item: i for i, item in enumerate(items)}
    with open(index, "a", encoding="utf-8") as log, tqdm(total=len(todo), desc="sampling", unit="image",
                                                         disable=not todo) as bar:
        for chunk, images in generate_batches(m, todo, args.steps, guidance, args.scheduler, args.batch_size,
                                              args.negative_prompt):
            for (prompt, seed), img in zip(chunk, tensor_to_uint8(images)):
                name = O.image_name(number[(prompt, seed)], seed)
                part = os.path.join(args.out, name[:-4] + ".part.png")
                Image.fromarray(img).save(part)
                os.replace(part, os.path.join(args.out, name))
                log.write(json.dumps(dict(prompt=prompt, seed=seed, file=name, **settings)) + "\n")
                if keep:
                    kept[(prompt, seed)] = img
            log.flush()
            bar.update(len(chunk))
    if not keep:
        return None
    for item in items:  # (the images of an earlier run, for the grid)
        if item not in kept:
            kept[item] = np.asarray(files.open_rgb(os.path.join(args.out, done[item]["file"])))
    return np.stack([kept[item] for item in items])


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args.prompts)  # before loading models: bad input fails in a second
    problem = O.sample_out_problem(args) or O.compare_problem(args)  # (--overwrite deletes later: O.make_out)
    if problem:
        raise SystemExit(problem)
    m = load_for_sampling(args)
    guidance = args.guidance if args.guidance is not None else (5.0 if m.xl else 7.5)  # docs/method.md, Evaluation
    if args.negative_prompt is not None and guidance <= 1:
        print(f"warning: --negative_prompt has no effect with --guidance {guidance} (no unconditional pass)",
              file=sys.stderr)
    try:
        images = write_samples(args, m, prompts, guidance)
    except OSError as err:  # a full disk: what is written is listed, --resume goes on from there
        raise SystemExit(O.write_failed(args.out, err))
    total = len(prompts) * len(args.seeds)
    print(f"{total} images ({len(prompts)} prompts x {len(args.seeds)} seeds, {args.scheduler}, "
          f"{args.steps} steps, guidance {guidance}) in {args.out}")
    if images is None:
        print(f"no grid.png{' nor compare.png' if args.compare else ''}: more than {GRID_MAX} images")
        return None
    scale = args.grid_scale or (4 if images.shape[1] < 64 else 1)
    make_grid(list(images), len(prompts), len(args.seeds), scale).save(os.path.join(args.out, "grid.png"))
    if args.compare:
        write_compare(args.compare, args.out, prompts, args.seeds, images, scale,
                      dict(steps=args.steps, guidance=guidance, scheduler=args.scheduler,
                           negative_prompt=args.negative_prompt))
    return images


if __name__ == "__main__":
    main()
