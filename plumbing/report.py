"""
What a training run reports besides its per-step lines: OUT_DIR/metrics.jsonl opened (resumed runs
continue it) and read back (open_metrics, read_metrics), OUT_DIR/args.json, the tracker of
--report_to (open_tracker, tracker_image), and at the end OUT_DIR/README.md, a model card that says
how the weights were made and how to load them (model_card, front_matter), the upload (push_to_hub)
and the last line (done_line). The per-step lines and the progress bar are train.Reporter's (in
train.py: it runs every step); the validation grids train.validate's (sample.py's sampler,
evaluate.py's scorers).
"""
import fnmatch
import json
import os

from huggingface_hub import ModelCardData

from plumbing import files, hub


def write_args(args):
    """OUT_DIR/args.json: every flag as the run resolved it (defaults filled in)."""
    files.write_atomic(os.path.join(args.out_dir, "args.json"), json.dumps(vars(args), indent=1))  # (never through a link)


# ---------------------------------------------------------------------------------------
# OUT_DIR/metrics.jsonl: the run's log, one JSON line per optimizer step (train.py's Reporter
# writes the lines; plots.py and the model card read them back)
def read_metrics(path, log=print):
    """The records of a metrics.jsonl; a last line cut short by a kill and unreadable lines are
    dropped, with a warning line each kind."""
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    cut = lines.pop() if lines else b""  # after the last newline: b"" unless the last write was cut short
    records, bad = [], []
    for number, line in enumerate(lines + ([cut] if cut.strip() else []), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not (isinstance(record, dict) and type(record.get("step")) is int):
                raise ValueError
        except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            if number > len(lines):
                log(f"warning: {path}: its last line is cut short (a run killed mid-write); dropped")
            else:
                bad.append(number)
            continue
        records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        log(f"warning: {path}: dropped {len(bad)} unreadable line(s) (line {shown})")
    return records


def open_metrics(out_dir, step, resumed):
    """OUT_DIR/metrics.jsonl for appending, one line per step, never two: a resumed run replays
    the steps after its checkpoint, so their old lines go (and any a kill cut short or that is
    not a record); a fresh run starts a fresh log. The kept lines are swapped in by a rename."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a folder; the run's log goes there")
    kept = []
    if resumed and os.path.exists(path):
        kept = [r for r in read_metrics(path) if r["step"] <= step]
    files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a")


# ---------------------------------------------------------------------------------------
# The model card, OUT_DIR/README.md
# The base models' licenses: a fine-tune keeps its base's (the tiny presets are this project's, MIT).
LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}


def open_tracker(args, step):
    """--report_to's tracker for train.Reporter: a TensorBoard writer (events under
    OUT_DIR/--logging_dir) or a Weights & Biases run, or None; a missing package is one line."""
    if args.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: --report_to tensorboard needs the tensorboard package (pip install tensorboard)")
        return SummaryWriter(os.path.join(args.out_dir, args.logging_dir), purge_step=step + 1 if args.resume else None)
    if args.report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --report_to wandb needs the wandb package (pip install wandb)")
        return wandb.init(project=args.tracker_name, dir=args.out_dir, config=vars(args),
                          name=os.path.basename(os.path.normpath(args.out_dir)), resume="allow")
    return None


def tracker_image(args, tracker, step, name, grid):
    """A validation grid (PIL image) to --report_to's tracker."""
    if args.report_to == "tensorboard":
        import numpy as np
        tracker.add_image(f"validation/{name}", np.asarray(grid), step, dataformats="HWC")
    elif args.report_to == "wandb":
        import wandb
        tracker.log({f"validation/{name}": wandb.Image(grid)}, step=step)


def front_matter(args, preset, folder):
    """The model card's YAML header, what the hub reads: base model, license, tags, library, data.
    preset: model.PRESETS' entry of --model."""
    hub = args.pretrained or preset["pretrained"]
    license_ = ("other" if args.pretrained else LICENSES.get(args.model)) if hub else "mit"
    method = {"rpo": "diffusion-rpo", "dpo": "diffusion-dpo", "sft": "sft"}.get(args.loss, args.loss)
    tags = ["text-to-image", "diffusers", "stable-diffusion-xl" if preset["xl"] else "stable-diffusion",
            method, "rpo-diffusion"] + (["lora"] if folder == "lora" else [])
    spec = args.data.split("#")[0]
    dataset = spec.split(":", 1)[1] if spec.startswith(("hf:", "pickapic:")) else None
    dataset = dataset if dataset and not os.path.exists(dataset) else None  # a hub id, not a local folder
    # huggingface_hub writes the YAML (quoted where a value needs it), in this order; a path that is
    # not UTF-8 as \xNN first, as the card shows it. (ModelCard itself is not used: its text puts
    # the keys in its own order, and its save writes in place, where the card is written whole or
    # not at all, never through a link: files.write_atomic.)
    data = ModelCardData(base_model=files.shown(hub) if hub else None, license=license_, library_name="diffusers",
                         tags=tags, datasets=[files.shown(dataset)] if dataset else None)
    order = ["base_model", "license", "library_name", "tags", "datasets"]
    return ["---"] + data.to_yaml(original_order=order).splitlines() + ["---", ""]


def model_card(args, preset, objective, step, pairs_per_step, folder, grid=None, command=None):
    """OUT_DIR/README.md: YAML front matter for the hub; base model, data, the objective and its
    settings (`objective`, in words), pairs per step, steps, the training command, the last step's
    figures, the last validation grid, and how to load the result in diffusers. preset: model.PRESETS'
    entry of --model."""
    hub = args.pretrained or preset["pretrained"]
    base = hub or f"the built-in `{args.model}` preset"
    pipe = "StableDiffusionXLPipeline" if preset["xl"] else "StableDiffusionPipeline"
    weights = os.path.join(args.out_dir, folder)
    if folder == "lora":  # (OUT_DIR holds pytorch_lora_weights.safetensors, as diffusers' scripts leave it)
        load = f"pipe = {pipe}.from_pretrained(\"{hub}\")\npipe.load_lora_weights(\"{args.out_dir}\")"
    else:
        load = (f"unet = UNet2DConditionModel.from_pretrained(\"{weights}\")\n"
                f"pipe = {pipe}.from_pretrained(\"{hub}\", unet=unet)")
    sample_cmd = (f"python sample.py --model {args.model}" + (f" --pretrained {hub}" if args.pretrained else "")
                  + f" --{'lora' if folder == 'lora' else 'unet'} {args.out_dir if folder == 'lora' else weights} --prompts "
                  + ("builtin" if hub else "toy-test") + " --seeds 0-3 --out samples")
    lines = front_matter(args, preset, folder) + ["# " + os.path.basename(os.path.normpath(args.out_dir)), "",
             f"A {'LoRA (rank ' + str(args.lora_rank) + ')' if folder == 'lora' else 'UNet'} fine-tuned from "
             f"{base} with rpo-diffusion.", "",
             "| | |", "|---|---|",
             f"| base model | {base} |", f"| data | `{args.data}` |", f"| objective | {objective} |",
             f"| pairs per optimizer step | {pairs_per_step} ({args.batch_size} per micro-batch × {args.grad_accum} "
             f"accumulation × {pairs_per_step // (args.batch_size * args.grad_accum)} processes) |",
             f"| optimizer steps | {step} (lr {args.lr:g}, warm-up {args.warmup_steps}, {args.optimizer}) |",
             f"| resolution | {args.resolution or preset['resolution']} |", "",
             "Every flag of the run: `args.json`; one line of figures per step: `metrics.jsonl`.", ""]
    if command:
        lines += ["Trained with:", "", "```bash", command, "```", ""]
    records = read_metrics(os.path.join(args.out_dir, "metrics.jsonl"), log=lambda line: None)  # (warned at open)
    figures = {k: v for k, v in (records[-1] if records else {}).items() if isinstance(v, (int, float))
               and k not in ("step", "epoch", "lr", "pairs_per_s")}
    if figures:
        lines += [f"At the last step ({step}): " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()) + ".", ""]
    if grid:
        lines += ["Validation samples at the last step (rows: prompts, columns: seeds):", "", f"![validation]({grid})", ""]
    lines += ["## Load it", "", "```bash", sample_cmd, "```", ""]
    if hub:  # the stock diffusers pipelines load the result as they are
        lines += ["```python", f"from diffusers import {pipe}, UNet2DConditionModel", load, "```", ""]
    # (a flag's path whose name is not UTF-8 is shown with \\xNN escapes: the card is UTF-8 text)
    files.write_atomic(os.path.join(args.out_dir, "README.md"), files.shown("\n".join(lines)))


def push_to_hub(args, folder, api=None):
    """--push_to_hub: OUT_DIR's result, model card, args.json, metrics and validation grids to the
    hub repo --hub_model_id (default OUT_DIR's name), through huggingface_hub; checkpoints stay
    local. Returns (repo, the files uploaded). No network, no login: one line (the weights are
    saved already)."""
    from huggingface_hub import HfApi
    api = api or HfApi()
    repo = args.hub_model_id or os.path.basename(os.path.normpath(args.out_dir))
    patterns = [f"{folder}/*", "README.md", "args.json", "metrics.jsonl", "validation/*.png"] + (
        ["pytorch_lora_weights.safetensors"] if folder == "lora" else [])
    found = [os.path.relpath(os.path.join(d, f), args.out_dir) for d, _, names in os.walk(args.out_dir) for f in names]
    files = sorted(f for f in found if any(fnmatch.fnmatch(f, p) for p in patterns))
    if hub.offline():
        raise SystemExit(f"error: --push_to_hub: HF_HUB_OFFLINE is set; the result is in {args.out_dir} (upload it "
                         f"later: hf upload {repo} {args.out_dir})")
    try:
        repo = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=args.out_dir, allow_patterns=patterns,
                          commit_message="rpo-diffusion: end of training")
    except Exception as err:  # no network, not logged in, no rights: the run itself is done and saved
        raise SystemExit(f"error: --push_to_hub {repo}: {hub.first_line(err)}; the result is in {args.out_dir} "
                         f"(hf auth login, then hf upload {repo} {args.out_dir})")
    return repo, files


def done_line(args, lora, step, skips):
    """The last line of a run: where its result is, and what was skipped (counted)."""
    return ((f"skipped (counted): {skips}\n" if skips else "") + f"done: {step} steps; " +
            (f"LoRA in {args.out_dir} (pytorch_lora_weights.safetensors, as diffusers' scripts leave it; also lora/)"
             if lora else f"UNet in {args.out_dir}/unet"))
