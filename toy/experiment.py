"""
The toy Style Alignment experiment (docs/method.md#style-alignment) at CPU scale: take (or pretrain) a small base
model, align it with SFT, DPO and RPO at equal step and pair budgets, sample held-out prompts,
and score how much of the preferred style the samples show (style) and whether they still
show the prompt (content).

    python -m toy.experiment                 # the demo: one seed, each method at about the same style (minutes on a CPU)
    python -m toy.experiment --study full    # seeds × a coarse lr grid × variants (the first study)

toy/frontier.py runs the main study, the style-content frontier, from the same base.

The data: prompts "a {colour} {shape} on a {background} background" (72 of them; 12 held out
for evaluation, toy_prompts). Preferred image = the "winter" version of a render,
dispreferred = the plain render, same prompt — the paper's Style Alignment set, built
procedurally. The base model is pretrained (plain denoising, --loss sft) on single images of
which a third carry the style with unchanged captions, so the preference pairs lie within the
base model's distribution, as real Pick-a-Pic pairs do: a base that never saw the style makes
DPO/RPO collapse (they meet the margin by raising the error on losers; docs/toy-study.md).
Style and content are judged by a small CNN trained on procedural renders
(evaluate.py), which must reach 95% held-out accuracy or the experiment stops.

The base that the committed results came from ships in results/toy-study/base and is used where
it fits the recipe (--pretrain trains it anew). Everything is cached under --runs (default runs/),
so an interrupted study resumes where it stopped and a rerun only does new work:
  - a run's folder is named by what made it (run_name: its train.py command, base, data and code),
    so a finished run is reused only for all four the same, and a changed variant trains into a
    folder of its own, never over another;
  - a score is keyed by the sha256 of the weights it scored, the prompts, the sampling settings,
    the scorer and the code (score_key), in RUNS/scores: a retrained model is always scored anew.
"The code" is code_id: the syntax of the six, plumbing/ and the toy world; a comment or docstring
edit keeps every run, any other edit retrains. The output counts what was reused.
"""
import argparse
import ast
import functools
import glob
import hashlib
import json
import os
import shlex
import shutil
import time

import torch

import evaluate
from plumbing import checks, files, plots
from plumbing import toy_scorer
import model as M
from plumbing import speed, tiny
import sample
import train
from plumbing.images import toy_prompts
from plumbing.images import tensor_to_uint8

# The base model's pretraining recipe (cached under RUNS/base; a change retrains it).
BASE_ARGS = ["--model", "tiny", "--loss", "sft", "--data", "toy-base", "--style", "winter", "--style_fraction", "0.3333",
             "--batch_size", "64", "--max_steps", "1200", "--lr", "5e-4", "--warmup_steps", "100",
             "--caption_dropout", "0.1", "--seed", "0"]
# The base the committed frontier and demo were run from, trained by BASE_ARGS on a CPU and
# shipped with the code: the toy's stand-in for downloading a pretrained model.
# A run whose recipe and frozen text encoder match it starts from it; --pretrain trains it anew.
SHIPPED_BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "toy-study", "base")
# Alignment: the same step and pair budget for every method (8 pairs × the study's steps).
ALIGN_ARGS = ["--model", "tiny", "--data", "toy", "--style", "winter", "--batch_size", "8", "--max_steps", "300"]
VARIANTS = {  # label -> train.py flags
    "sft": ["--loss", "sft"],
    "dpo": ["--loss", "dpo"],
    "rpo τ=0.1": ["--loss", "rpo", "--tau", "0.1"],
    "rpo τ=0.5": ["--loss", "rpo", "--tau", "0.5"],
    "rpo τ=0.5 inside": ["--loss", "rpo", "--tau", "0.5", "--rpo_weighting", "inside"],
    "rpo τ=0.5 text": ["--loss", "rpo", "--tau", "0.5", "--embed", "text"],
}
# A shared learning-rate grid, one point per decade: at equal lr the methods take very different
# effective steps (β = 5000 scales DPO's logits, RPO's weights spread its gradient over the
# batch, SFT has neither), so only the style-content frontier across the grid compares them
# fairly. Calibrated by hand on this base: DPO goes from little change (1e-7) to trading most
# content for style (1e-6); SFT barely moves below 1e-6.
# The demo instead gives each method its own lr: the first whose 150-step run in the frontier
# study (toy/frontier.py, training seed 0) reached style 0.7, so its table compares content at about
# the same style, which is the comparison that means something (docs/toy-study.md). With the
# shipped base and the frontier's 8 sampling seeds, its rows are those frontier points again (the
# weights agree to float rounding, which the thread count decides).
STUDIES = {
    "demo": dict(variants=["sft", "dpo", "rpo τ=0.5"], lrs={"sft": [3.2e-4], "dpo": [1e-6], "rpo τ=0.5": [1e-5]},
                 seeds=[0], steps=150, sample_seeds=8),
    # (made with the random CLIP that was the tiny presets' E5 embedder then: RPO_DIFFUSION_TOY_E5=tiny)
    "full": dict(variants=["sft", "dpo", "rpo τ=0.1", "rpo τ=0.5", "rpo τ=0.5 inside"], lrs=[1e-7, 1e-6, 1e-5],
                 seeds=[0, 1, 2]),
    "smoke": dict(variants=["sft", "dpo", "rpo τ=0.5"], lrs=[1e-7, 1e-6], seeds=[0, 1]),  # tests: every code path
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="demo", choices=list(STUDIES))
    p.add_argument("--runs", default="runs", help="where base, runs and results are cached")
    p.add_argument("--sample_seeds", type=int, default=None,
                   help="sampling seeds per held-out prompt and training seed (default: the study's; 8 for the demo, "
                        "as toy/frontier.py, else 4)")
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--curve_every", type=int, default=100,
                   help="the curve runs (first seed, middle lr) score their samples every N steps while training")
    p.add_argument("--base_steps", type=int, default=1200, help="pretraining steps of the base (recipe: 1200)")
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the base here even where the shipped one (results/toy-study/base) fits the recipe")
    p.add_argument("--align_steps", type=int, default=None,
                   help="alignment steps per run (default: the study's, 300; the demo's 150)")
    p.add_argument("--variants", default=None,
                   help="comma list: only these of the study's variants (to split a study over processes; "
                        "a last run without it collects everything into the table)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME='TRAIN FLAGS'",
                   help="a variant: a name and any train.py flags (repeatable); with it the study is these "
                        "variants × --lrs × --seeds, e.g. --variant dpo='--loss dpo' --variant inside='--loss rpo --rpo_weighting inside'")
    p.add_argument("--lrs", default=None, help="with --variant: comma list of learning rates (default 1e-6)")
    p.add_argument("--seeds", default=None, help="with --variant: comma list of training seeds (default 0)")
    p.add_argument("--out", default=None, help="where the results go (default RUNS/STUDY)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    check_places(p, args)
    args.custom = {}
    for spec in args.variant or []:  # NAME='TRAIN FLAGS': checked by train.py's own parser, before any work
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            p.error(f"--variant {spec!r}: write NAME='TRAIN FLAGS', e.g. dpo='--loss dpo'")
        if name.strip() in args.custom:
            p.error(f"--variant {name.strip()} is given twice: name each variant once")
        try:
            args.custom[name.strip()] = shlex.split(flags)
            train.parse_args(ALIGN_ARGS + args.custom[name.strip()])
        except ValueError as err:  # (shlex: a quote left open)
            p.error(f"--variant {name.strip()}: {flags!r} cannot be split into flags ({err})")
        except SystemExit:
            p.error(f"--variant {name.strip()}: train.py does not take {flags!r} (its message is above)")
        taken = study_set_flags(args.custom[name.strip()])
        if taken:
            p.error(f"--variant {name.strip()}: {taken} is the study's to set (--lrs, --seeds, --device, --runs): "
                    f"leave it out")
    try:
        lrs = [float(x) for x in (args.lrs or "1e-6").split(",")]
        seeds = [int(x) for x in (args.seeds or "0").split(",")]
    except ValueError:
        p.error(f"--lrs and --seeds are comma lists of numbers, not {args.lrs!r}, {args.seeds!r}")
    if not all(0 < lr < float("inf") for lr in lrs) or not all(s >= 0 for s in seeds):
        p.error("--lrs must be positive and finite, --seeds 0 or more")
    if args.custom:
        STUDIES["custom"] = dict(variants=list(args.custom), lrs=lrs, seeds=seeds)
        args.study = "custom"
    elif args.lrs or args.seeds:
        p.error("--lrs and --seeds go with --variant (a study of your own)")
    unknown = [v for v in (args.variants or "").split(",") if v and v not in STUDIES[args.study]["variants"]]
    if unknown:
        p.error(f"--variants: {', '.join(unknown)} not in the {args.study} study's "
                f"({', '.join(STUDIES[args.study]['variants'])})")
    return args


# What align() sets after a variant's own flags (its command's last word on them): a variant
# setting one would be overridden without a word
STUDY_SET = ("init", "lr", "seed", "keep_checkpoints", "device", "no_progress", "log_every", "out_dir", "overwrite",
             "validation_prompts", "validation_every", "validation_seeds", "validation_metric",
             "validation_inference_steps", "validation_guidance")


def study_set_flags(flags):
    """The first of FLAGS (train.py's, under any of their names) that the study sets itself, or None."""
    names = train.parser()._option_string_actions
    return next((f for f in flags if f.startswith("--") and f.split("=")[0] in names
                 and names[f.split("=")[0]].dest in STUDY_SET), None)


def check_places(p, args):
    """The toy runners' own checks (toy.frontier and toy.factorial call it too), one line each
    (p.error): their counts at least 1 (a 0 was a ZeroDivisionError, or the default without a word),
    --guidance finite and 0 or more, --runs and --out (where given) folders that can be written."""
    checks.plain_numbers(p, args, positive=("sample_steps", "sample_seeds", "align_steps", "curve_every", "base_steps",
                                            "max_jobs"), non_negative=("guidance",))
    for flag in ("--runs", "--out"):
        problem = getattr(args, flag[2:]) is not None and files.folder_problem(getattr(args, flag[2:]), flag)
        if problem:
            p.error(problem.removeprefix("error: "))


@functools.lru_cache(maxsize=None)
def code_id(root=None):
    """sha256 (12 hex digits) of the code that trains and samples a run, as Python reads it: the
    syntax trees of the six files, plumbing/ (the toy world, its CLIP and scorer among it) and toy-clip's
    training (toy/clip.py), docstrings dropped
    (comments are not in a syntax tree). A comment or docstring edit keeps every run and score;
    any other edit retrains and rescores all of them, even one that changes nothing a run
    computes (a move of code is shown to change nothing by tools.same_runs, not here). The trees
    are Python's: another Python version may read the same code into another tree, and retrain.
    (Cached for the process: a study is made by the code it started with.)"""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "plumbing", "*.py"))
                   + [os.path.join(root, "toy", "clip.py")])
    h = hashlib.sha256()
    for path in files:
        tree = ast.parse(open(path, "rb").read())
        for node in ast.walk(tree):  # drop docstrings: a node's first statement, when a bare string
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                    isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                    isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(os.path.relpath(path, root).encode())
        h.update(ast.dump(tree, include_attributes=False).encode())
    return h.hexdigest()[:12]


def data_id(command):
    """What a run's --data holds, when it is a local file or folder: sha256 (12 hex digits) of the
    file, or of a folder's file names, sizes and modification times (the toy sets are made by the
    code that code_id hashes). A run on changed data is not reused."""
    spec = command[command.index("--data") + 1] if "--data" in command else "toy"
    path = spec.split(":", 1)[-1].split("#")[0]
    if spec in ("toy", "toy-base") or not os.path.exists(path):  # (a hub id: its name is what is known here)
        return spec
    h = hashlib.sha256(spec.encode())
    if os.path.isfile(path):
        h.update(open(path, "rb").read())
    else:
        for root, _, names in sorted(os.walk(path)):
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def slug(label):
    return label.replace("τ=", "tau").replace(" ", "-")


def study_lrs(study, label):
    """A study's lrs for one variant: a shared list, or per variant (the demo's)."""
    return study["lrs"][label] if isinstance(study["lrs"], dict) else study["lrs"]


def made_from(command, base):
    """What made a run: its train.py command (less --out_dir, where it is written), the base it
    started from (base_id), its data (data_id) and the code (code_id)."""
    i = command.index("--out_dir") if "--out_dir" in command else len(command)
    command = command[:i] + command[i + 2:]
    return {"base": base, "command": command, "code": code_id(), "data": data_id(command)}


def run_name(made):
    """A run folder's name: the sha256 (12 hex digits) of what made it. Another command, base, data
    or code is another folder, so a changed variant never overwrites (or is answered by) an earlier run."""
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:12]


def align_dir(runs, label, lr, seed, made):
    """One alignment run's folder: RUNS/align/VARIANT/lrLR-seedSEED-<run_name>."""
    return os.path.join(runs, "align", slug(label), f"lr{lr:g}-seed{seed}-{run_name(made)}")


def weights_id(unet_dir):
    """sha256 (16 hex digits) of a saved UNet's weight files: a score belongs to these bytes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(unet_dir)):
        if name.endswith(".safetensors"):
            with open(os.path.join(unet_dir, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def score_key(unet_dir, prompts, seeds, args, scorer_id):
    """What a score depends on: the weights' bytes, the prompts, sampling seeds, sampler steps and
    guidance, the scorer's identity and the code that samples (code_id)."""
    return {"weights": weights_id(unet_dir), "prompts": list(prompts), "seeds": list(seeds), "steps": args.sample_steps,
            "guidance": args.guidance, "scorer": scorer_id, "code": code_id()}


def scored(runs, unet_dir, prompts, seeds, args, scorer, scorer_id, lookup_only=False):
    """A UNet's score from RUNS/scores (one file per score key: shared by toy.experiment and
    toy.frontier and by parallel workers), else sampled and scored now -> (score, reused).
    lookup_only: None when it is not there."""
    key = score_key(unet_dir, prompts, seeds, args, scorer_id)
    path = os.path.join(runs, "scores", hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if os.path.exists(path):
        return json.load(open(path))["score"], True
    if lookup_only:
        return None, False
    score = score_unet(unet_dir, prompts, seeds, args, scorer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f".{os.getpid()}", "w") as f:
        json.dump({"key": key, "score": score}, f)
    os.replace(path + f".{os.getpid()}", path)  # (whole: another worker may read it now)
    return score, False


def with_steps(argv, steps):
    return [str(steps) if i > 0 and argv[i - 1] == "--max_steps" else a for i, a in enumerate(argv)]


def with_style(argv, style):
    return [style if i > 0 and argv[i - 1] == "--style" else a for i, a in enumerate(argv)]


def frozen_fingerprint():
    """sha256 of what a tiny-preset UNet is conditioned on: the frozen text encoder's weights (random,
    from a fixed seed) and the token ids of every toy prompt and of "" (classifier-free guidance).
    A base trained under another fingerprint (a transformers version that initialises CLIP
    otherwise, say) would be fed text features it never saw."""
    parts = tiny.build_tiny(False, False)
    h = hashlib.sha256()
    for name, tensor in sorted(parts["text_encoders"][0].state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    ids = parts["tokenizers"][0](toy_prompts("all") + [""], padding="max_length", truncation=True)["input_ids"]
    h.update(json.dumps(ids).encode())
    return h.hexdigest()


def shipped_base_fits(shipped, recipe):
    """Whether the shipped base was trained by `recipe` for today's frozen parts (one line says why not)."""
    if not shipped or not os.path.exists(os.path.join(shipped, "recipe.json")):
        return False
    if json.load(open(os.path.join(shipped, "recipe.json"))) != recipe:
        return False  # another recipe (steps, style, device): another base, pretrained here
    if open(os.path.join(shipped, "fingerprint.txt")).read().strip() != frozen_fingerprint():
        print(f"base: {shipped} was trained with other frozen text-encoder weights (another transformers or "
              f"torch version?); pretraining anew")
        return False
    return True


def shipped_base(style):
    """The shipped base of a style: results/toy-study/base (winter), results/toy-study/base-sketch."""
    return SHIPPED_BASE if style == "winter" else f"{SHIPPED_BASE}-{style}"


def pretrain_base(base_dir, device, steps, style="winter", shipped=True):
    """The toy base (a third of its images in `style`), cached in base_dir: copied from the shipped
    one (shipped=True: the style's, shipped_base; or a folder; None: none) where it fits the recipe,
    else trained once; a rerun with the same recipe reuses it."""
    shipped = shipped_base(style) if shipped is True else shipped
    recipe = with_style(with_steps(BASE_ARGS, steps), style) + ["--device", device]
    done, copied = os.path.join(base_dir, "recipe.json"), os.path.join(base_dir, "shipped")
    if (os.path.exists(done) and json.load(open(done)) == recipe and os.path.isdir(os.path.join(base_dir, "unet"))
            and (shipped or not os.path.exists(copied))):  # (--pretrain: a copy of the shipped one won't do)
        print(f"base: cached in {base_dir}")
        return
    if shipped_base_fits(shipped, recipe):
        shutil.rmtree(base_dir, ignore_errors=True)  # (what a pretraining with another recipe left)
        shutil.copytree(os.path.join(shipped, "unet"), os.path.join(base_dir, "unet"))
        open(copied, "w").write(f"{shipped}\n")
        json.dump(recipe, open(done, "w"))
        print(f"base: the shipped one, {shipped} (this recipe's; --pretrain trains it anew)")
        return
    t0 = time.time()
    train.main(recipe + ["--out_dir", base_dir, "--no_progress", "--log_every", "200", "--keep_checkpoints", "1",
                         "--overwrite"])
    if os.path.exists(copied):
        os.remove(copied)
    json.dump(recipe, open(done, "w"))
    print(f"base: pretrained in {time.time() - t0:.0f}s")


def sampling_seeds(seed, n):
    """The sampling seeds of training seed `seed`'s runs (toy/frontier.py's too: the demo's rows are its points)."""
    return [seed * 1000 + k for k in range(n)]


def base_id(base_dir):
    """The base's identity, its weights' sha256 (12 hex digits): runs and scores made from another
    base (--pretrain, --base_steps) are not reused."""
    with open(os.path.join(base_dir, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def align(runs, label, flags, steps, lr, seed, base_dir, base, args, validation):
    """One alignment run (train.py with `flags`) from the base in base_dir (id `base`, base_id's)
    -> (its folder, its full train.py command, whether a finished run was reused). The folder is named by what made it (run_name), so
    a finished run there is reused (and says so) and any other command, base, data or code trains
    into a folder of its own; --overwrite only ever clears this command's own unfinished run."""
    command = with_steps(ALIGN_ARGS, steps) + flags + [
        "--init", os.path.join(base_dir, "unet"), "--lr", str(lr), "--seed", str(seed), "--keep_checkpoints", "1",
        "--device", args.device, "--no_progress", "--log_every", "100"] + validation
    made = made_from(command, base)
    run = align_dir(runs, label, lr, seed, made)
    command += ["--out_dir", run, "--overwrite"]
    record = os.path.join(run, "made_from.json")
    if os.path.exists(os.path.join(run, "unet", "config.json")) and os.path.exists(record) \
            and json.load(open(record)) == made:
        print(f"{label} lr={lr:g} seed={seed}: reused run {run} (same command, base, data and code)")
        return run, command, True
    t0 = time.time()
    train.main(command)
    with open(record, "w") as f:
        json.dump(made, f)
    print(f"{label} lr={lr:g} seed={seed}: trained {run} in {time.time() - t0:.0f}s (no finished run of this "
          f"command, base, data and code)")
    return run, command, False


def sample_unet(unet_dir, prompts, seeds, args):
    m = M.load_models("tiny", init_unet=unet_dir, device=args.device, reference=False)
    return sample.generate(m, prompts, seeds, steps=args.sample_steps, guidance=args.guidance, scheduler="ddim")


def score_unet(unet_dir, prompts, seeds, args, scorer):
    """Sample the held-out prompts from one UNet and score them. Style = share of samples the
    scorer calls styled; content = share showing the prompt's shape, colour and background."""
    images = sample_unet(unet_dir, prompts, seeds, args)
    scores = toy_scorer.score_toy(scorer, images, [p for p in prompts for _ in seeds])  # prompt-major
    return {"style": float((scores["style"] > 0.5).float().mean()), "content": float(scores["content"].float().mean())}


def main(argv=None):
    args = parse_args(argv)
    study = dict(STUDIES[args.study])
    if args.variants:
        study["variants"] = [v for v in args.variants.split(",") if v in study["variants"]]
    steps = args.align_steps or study.get("steps", 300)
    out = args.out or os.path.join(args.runs, args.study)
    os.makedirs(out, exist_ok=True)
    base_dir = os.path.join(args.runs, "base")
    t_start = time.time()
    pretrain_base(base_dir, args.device, args.base_steps, shipped=None if args.pretrain else True)
    scorer, accuracy = toy_scorer.load_toy_scorer("winter", 16)  # (its default cache, which train.py's validation shares)
    scorer_id = toy_scorer.identity("winter", 16)
    variants = {**VARIANTS, **args.custom}
    prompts = toy_prompts("test")
    args.sample_seeds = args.sample_seeds or study.get("sample_seeds", 4)
    sample_seeds = lambda seed: sampling_seeds(seed, args.sample_seeds)
    base = base_id(base_dir)

    # Scores are cached in RUNS/scores by the weights' bytes, prompts, sampling settings, scorer and
    # code (score_key), so a rerun or an extended study only does new work, a retrained run is
    # always scored anew, and a changed setting is never answered from the cache.
    reused = {"runs": 0, "scores": 0}

    def score(unet_dir, seed):
        result, hit = scored(args.runs, unet_dir, prompts, sample_seeds(seed), args, scorer, scorer_id)
        reused["scores"] += hit
        return result

    rows = [{"model": "base", "lr": None, "per_seed": [score(os.path.join(base_dir, "unet"), s) for s in study["seeds"]]}]
    curves, style_points, runs, folders = {}, {}, [], {}
    for label in study["variants"]:
        lrs = study_lrs(study, label)
        for lr in lrs:
            per_seed = []
            for seed in study["seeds"]:
                curve = seed == study["seeds"][0] and lr == lrs[len(lrs) // 2]
                # The curve runs score their own samples while training (train.py's validation: the
                # held-out prompts, this seed's sampling seeds, the toy scorer, every curve_every steps).
                validation = ["--validation_prompts", "toy-test", "--validation_every", str(args.curve_every),
                              "--validation_seeds", ",".join(map(str, sample_seeds(seed))), "--validation_metric", "toy",
                              "--validation_inference_steps", str(args.sample_steps), "--validation_guidance", str(args.guidance)]
                run, command, hit = align(args.runs, label, variants[label], steps, lr, seed, base_dir, base, args,
                                     validation if curve else [])
                folders[label, lr, seed] = run
                reused["runs"] += hit
                per_seed.append(score(os.path.join(run, "unet"), seed))
                runs.append({"variant": label, "lr": lr, "seed": seed, "command": shlex.join(["python", "train.py",
                                                                                           *command]),
                             **per_seed[-1], "scorer": scorer_id})
                if curve:  # the curves: style over training steps, from the validation scores in metrics.jsonl
                    name = f"{label} lr={lr:g}"
                    curves[name] = run
                    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
                    style_points[name] = [(0, rows[0]["per_seed"][0]["style"])] + [
                        (r["step"], r["val_toy_style"]) for r in log if "val_toy_style" in r]
            rows.append({"model": label, "lr": lr, "per_seed": per_seed})

    # ---------------------------------------------------------------------------------
    # Table (mean ± std over training seeds), plots, grid.
    table_rows = []
    for row in rows:
        entry = {"model": row["model"] + ("" if row["lr"] is None else f" lr={row['lr']:g}")}
        for metric in ("style", "content"):
            row[metric] = evaluate.summarize([r[metric] for r in row["per_seed"]])  # (mean, std)
            # one training seed (the demo): no spread to report in the table
            entry[metric] = row[metric][0] if len(row["per_seed"]) == 1 else row[metric]
        table_rows.append(entry)
    table = evaluate.markdown_table(table_rows, ["model", "style", "content"])
    print(f"\nheld-out prompts: {len(prompts)}, sampling seeds per prompt: {args.sample_seeds}, "
          f"training seeds: {study['seeds']}, scorer accuracy: {accuracy}\n"
          f"(exact on this machine for this code; another CPU rounds training differently, which moves the "
          f"figures: docs/toy-study.md#what-reproduces-and-across-machines)\n")
    print(table)
    print(f"\n{reused['runs']} of {len(runs)} runs and {reused['scores']} of {len(runs) + len(rows[0]['per_seed'])} "
          f"scores reused (same command, base, data and code; a score: the same weights' bytes, sampling, scorer and "
          f"code); the rest made now")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    json.dump({"study": args.study, "runs": runs, "rows": rows, "scorer": scorer_id, "scorer_accuracy": accuracy,
               "code": code_id(), "made_on": speed.machine(), "prompts": prompts,
               "base_recipe": BASE_ARGS, "align_args": with_steps(ALIGN_ARGS, steps), "sample_steps": args.sample_steps,
               "guidance": args.guidance, "sample_seeds": args.sample_seeds},
              open(os.path.join(out, "results.json"), "w"), indent=1)
    plots.plot_curves(curves, os.path.join(out, "curves.png"), style_points=style_points)
    tradeoff = any(len(study_lrs(study, v)) > 1 for v in study["variants"])
    if tradeoff:
        points = {}
        for row in rows[1:]:
            points.setdefault(row["model"], []).append((row["lr"], *row["style"], *row["content"]))
        plots.plot_tradeoff(points, os.path.join(out, "tradeoff.png"))
    # The grid: rows base, then each method at its middle lr (first training seed); columns:
    # the held-out prompts, one sampling seed, the same for every row.
    seed = study["seeds"][0]
    mid = {v: study_lrs(study, v)[len(study_lrs(study, v)) // 2] for v in study["variants"]}
    unets = [os.path.join(base_dir, "unet")] + [os.path.join(folders[v, mid[v], seed], "unet") for v in study["variants"]]
    images = torch.cat([sample_unet(u, prompts, [sample_seeds(seed)[0]], args) for u in unets])
    sample.make_grid(tensor_to_uint8(images), rows=len(unets), cols=len(prompts), scale=4).save(
        os.path.join(out, "grid.png"))
    with open(os.path.join(out, "grid.txt"), "w") as f:
        f.write("rows: base, " + ", ".join(f"{v} lr={mid[v]:g}" for v in study["variants"]) + "\ncolumns: " +
                " | ".join(prompts) + "\n")
    print(f"\nwrote {out}/results.md, results.json, curves.png{', tradeoff.png' if tradeoff else ''}"
          f", grid.png in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
