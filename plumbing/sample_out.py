"""
sample.py's output folder: which files it owns (samples.jsonl, its images, grid.png, compare.png),
when a folder may be written (empty, or sample.py's own with --resume or --overwrite, the rules
train.py keeps for --out_dir) and what --resume continues (the images samples.jsonl lists, sampled
with the same settings, prompts and seeds).
"""
import contextlib
import errno
import fnmatch
import json
import os

from plumbing import files


# The settings an image depends on, as samples.jsonl records them: --resume continues only a
# folder sampled with the same ones
RECORDED = ("model", "unet", "lora", "steps", "guidance", "scheduler", "negative_prompt")


def image_name(i, seed):
    return f"{i:04d}_seed{seed}.png"


def read_done(out, items, settings):
    """--resume: OUT's samples.jsonl -> {(prompt, seed): record} of the images already written
    (a last line cut short by a kill is dropped; a listed image that is gone is made again).
    Refused in one line: a folder sampled with other settings, or whose images are named for
    other prompts or seeds (writing this command's names would replace them)."""
    index = os.path.join(out, "samples.jsonl")
    if not os.path.isfile(index):
        return {}
    names = {item: image_name(i, item[1]) for i, item in enumerate(items)}
    done = {}
    lines = files.read_utf8(index).split("\n")
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            if n == len(lines):  # (cut short by a kill)
                continue
            raise SystemExit(f"error: --resume: {index}:{n}: not valid JSON")
        if rec is None:
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and type(rec.get("seed")) is int):
            raise SystemExit(f"error: --resume: {index}:{n}: not a sample.py record")
        changed = next((k for k in RECORDED if rec.get(k) != settings[k]), None)
        if changed:
            raise SystemExit(f"error: --resume: {out} was sampled with --{changed} {rec.get(changed)}, this command "
                             f"with {settings[changed]}; continue it with the same settings, or choose another --out")
        key = (rec["prompt"], rec["seed"])
        if names.get(key) != rec.get("file"):
            raise SystemExit(f"error: --resume: {index}:{n}: {rec.get('file')} is not this command's image of that "
                             f"prompt and seed (other --prompts or --seeds); resume with the same ones, or choose "
                             f"another --out")
        if os.path.isfile(os.path.join(out, rec["file"])):
            done[key] = rec
    return done


def sample_out_problem(args, delete=False):
    """--out: an empty folder or sample.py's own output (samples.jsonl, its images, grid.png,
    compare.png); an earlier output is continued with --resume or replaced with --overwrite, which
    deletes it only with delete=True (make_out, once the models have loaded)."""
    if args.resume and args.overwrite:
        return "error: --overwrite starts over and --resume continues: pass one of them"

    def owned():
        listed = []
        if os.path.isfile(os.path.join(args.out, "samples.jsonl")):
            for line in files.read_utf8(os.path.join(args.out, "samples.jsonl")).splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    path = files.path_inside(args.out, json.loads(line)["file"])
                    listed += [path] if path else []
        return listed + [os.path.join(args.out, n) for n in os.listdir(args.out) if fnmatch.fnmatch(n, "*_seed*.png")
                         or n in ("samples.jsonl", "grid.png", "compare.png") or n.endswith(".part.png")]
    # (evaluate.py's results.json/.png are often written into a sample folder: they may stay)
    return files.output_folder_problem(args.out, "--out", ("samples.jsonl", "grid.png", "compare.png", "*_seed*.png"),
                                       owned, args.overwrite, args.resume, "--resume",
                                       tolerated=("results.json", "results.png"), delete=delete)


def make_out(args):
    """--out made, and with --overwrite its earlier output deleted: only now that the models have
    loaded, so a mistake in --unet, --lora or --pretrained never costs the earlier images."""
    problem = sample_out_problem(args, delete=True) if args.overwrite else None
    if problem:
        raise SystemExit(problem)
    os.makedirs(args.out, exist_ok=True)


def compare_problem(args):
    """--compare: an earlier output of sample.py (its samples.jsonl read now, not after sampling),
    and not an --out that --overwrite empties. One error line, or None."""
    if not args.compare:
        return None
    if args.overwrite and os.path.realpath(args.compare) == os.path.realpath(args.out):
        return f"error: --compare {args.compare} is --out, whose images --overwrite deletes: compare another folder"
    if not os.path.isfile(os.path.join(args.compare, "samples.jsonl")):
        return f"error: --compare {args.compare}: no samples.jsonl there"
    files.read_index(args.compare)  # (a damaged folder ends in its own line)
    return None


def write_failed(out, err):
    """The line for an OSError while writing --out's images: a full disk keeps what is written
    (--resume goes on from it); anything else is said as it is."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"error: cannot write in {out}: {err.strerror}; the images written so far are listed in its "
                f"samples.jsonl: free space, then rerun with --resume")
    return f"error: cannot write in {out}: {err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
