"""
Style Alignment pairs from real images (docs/method.md#style-alignment): winner = the
InstructPix2Pix edit of a source image into the style, loser = the source, same prompt.

    python -m tools.build_style --style vangogh --src pairs.jsonl --out /data/style-vangogh --limit 10000

The "toy-*" styles are the toy world's procedural edits and run offline.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

import data
import model as M
from plumbing import checks, files, hub, pickapic
from plumbing.image_files import decode_image
from plumbing.images import apply_style


STYLE_EDITS = {  # InstructPix2Pix instructions; "toy-*" are plumbing/images.py's procedural edits (offline)
    "vangogh": "make it a Van Gogh painting",
    "sketch": "turn it into a pencil sketch",
    "winter": "make it winter",
    "toy-winter": None,
    "toy-sketch": None,
}

def style_sources(src, split="train"):
    """(source id, prompt, PIL image) for build-style: the winners of a .jsonl manifest, or the
    preferred images of a Pick-a-Pic parquet folder (ties and unreadable rows skipped, counted)."""
    if str(src).endswith(".jsonl"):
        ds = data.ManifestPairs(src)
        for i, (prompt, winner, _) in enumerate(ds.pairs):
            img = decode_image(winner)
            if img is not None:
                yield i, prompt, img
        return
    ds = pickapic.PickapicParquet(src, split=split)
    for i in range(len(ds)):
        caption, ((_, preferred), _), _ = ds.row(i)
        img = decode_image(preferred)  # (the loser stays undecoded: build-style does not use it)
        if img is not None:
            yield i, caption, img

def square_crop(img, resolution):
    """Shorter side to `resolution`, centre crop: editor input and the loser share the framing."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))

def build_style(style, src, out, editor="timbrooks/instruct-pix2pix", limit=None, resolution=512, steps=20,
                guidance=7.5, image_guidance=1.5, batch_size=4, device="cpu", mixed_precision="no", seed=0,
                split="train", progress=True):
    """Edit each source image into `style` and append {"prompt", "winner", "loser", "source"}
    lines to OUT/pairs.jsonl (images under OUT/images/). Resumable: sources already in the
    manifest are skipped, and a line is written only after both of its images, so an
    interrupted run leaves at most orphan PNGs that the rerun overwrites. The settings that make
    a pair are kept in OUT/settings.json: a rerun with others (another --style, --src, ...) is
    refused, as it would skip sources done in another way, or mix two sets. Returns new pairs."""
    if style not in STYLE_EDITS:
        raise ValueError(f"unknown --style {style!r}; choose from {', '.join(STYLE_EDITS)}")
    if not os.path.exists(src):
        raise FileNotFoundError(f"--src {src} not found")
    real = STYLE_EDITS[style] is not None  # (the editor's settings make no toy pair)
    same_settings(out, dict(style=style, src=os.path.abspath(src), src_split=split, resolution=resolution, seed=seed,
                            **dict(editor=editor, steps=steps, guidance=guidance, image_guidance=image_guidance)
                            if real else {}))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    manifest = os.path.join(out, "pairs.jsonl")
    done = set()
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            done = {json.loads(line)["source"] for line in f if line.strip()}
    pipe = None
    if STYLE_EDITS[style] is not None:
        from diffusers import StableDiffusionInstructPix2PixPipeline
        try:  # the safety checker would turn flagged edits into black images: bad training data
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                editor, torch_dtype=M.DTYPES[mixed_precision], safety_checker=None, requires_safety_checker=False,
                use_safetensors=True)  # (never a pickle)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot load the InstructPix2Pix editor '{editor}' ({hub.first_line(err)}). "
                             f"Download it once and pass --editor /path/to/folder, or use --style toy-{style}")
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    todo = []
    new = 0

    def flush():
        nonlocal new
        if pipe is not None:
            edited = pipe(prompt=[STYLE_EDITS[style]] * len(todo), image=[img for _, _, img in todo],
                          num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_guidance,
                          generator=[torch.Generator().manual_seed(seed * 1_000_003 + i) for i, _, _ in todo]).images
        else:
            edited = [Image.fromarray(apply_style(np.asarray(img), style[4:], np.random.default_rng([seed, i])))
                      for i, _, img in todo]
        with open(manifest, "a", encoding="utf-8") as f:
            for (i, prompt, img), ed in zip(todo, edited):
                names = [f"images/{i:07d}_{kind}.png" for kind in ("edit", "source")]
                ed.convert("RGB").resize(img.size, Image.BICUBIC).save(os.path.join(out, names[0]))
                img.save(os.path.join(out, names[1]))
                f.write(json.dumps({"prompt": prompt, "winner": names[0], "loser": names[1], "source": i}) + "\n")
                f.flush()
                new += 1
        todo.clear()

    from tqdm import tqdm
    bar = tqdm(total=limit, desc=f"build-style {style}", disable=not progress)
    for i, prompt, img in style_sources(src, split):
        if limit is not None and len(done) + new + len(todo) >= limit:
            break
        if i in done:
            continue
        todo.append((i, prompt, square_crop(img, resolution)))
        if len(todo) == batch_size:
            flush()
            bar.update(batch_size)
    if todo:
        bar.update(len(todo))
        flush()
    bar.close()
    return new


def same_settings(out, settings):
    """OUT/settings.json: written for a new output (or an older one that has none), compared on a rerun."""
    path = os.path.join(out, "settings.json")
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except FileNotFoundError:
        os.makedirs(out, exist_ok=True)
        return files.write_atomic(path, json.dumps(settings, indent=1))
    except (OSError, ValueError) as err:
        raise ValueError(f"--out {out}: {path} cannot be read ({type(err).__name__}); it records how the pairs there "
                         f"were made: restore it, or choose another --out")
    changed = [k for k in settings if not isinstance(before, dict) or before.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise ValueError(f"--out {out} was built with --{k} {before.get(k) if isinstance(before, dict) else '?'}, this "
                         f"command has --{k} {settings[k]}: choose another --out (its pairs would be skipped or mixed)")


def main(argv=None):
    import argparse
    s = argparse.ArgumentParser(description="Style Alignment pairs: InstructPix2Pix edits (winner) of source images (loser)")
    s.add_argument("--style", required=True, choices=list(STYLE_EDITS))
    s.add_argument("--src", required=True, help="a .jsonl manifest (its winners) or a Pick-a-Pic parquet folder (preferred images)")
    s.add_argument("--out", required=True, help="writes OUT/pairs.jsonl and OUT/images/")
    s.add_argument("--limit", type=int, default=None, help="stop when the manifest holds this many pairs")
    s.add_argument("--editor", default="timbrooks/instruct-pix2pix", help="hub id or local folder")
    s.add_argument("--resolution", type=int, default=512)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=7.5, help="text guidance")
    s.add_argument("--image_guidance", type=float, default=1.5, help="image guidance (higher: closer to the source)")
    s.add_argument("--batch_size", type=int, default=4)
    s.add_argument("--src_split", default="train", help="Pick-a-Pic folder: shard name prefix")
    s.add_argument("--device", default="auto")
    s.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    s.add_argument("--seed", type=int, default=0)
    args = s.parse_args(argv)
    checks.plain_numbers(s, args, positive=("limit", "resolution", "steps", "batch_size"),
                         non_negative=("guidance", "image_guidance", "seed"))
    # train.py's rule for a folder it writes: empty, or its own output, which it continues (resumable)
    problem = files.output_folder_problem(args.out, "--out", ["pairs.jsonl", "images", "settings.json"], list, resuming=True)
    if problem:
        raise SystemExit(problem)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        new = build_style(args.style, args.src, args.out, args.editor, args.limit, args.resolution, args.steps,
                          args.guidance, args.image_guidance, args.batch_size, device, args.mixed_precision,
                          args.seed, args.src_split)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {new} new pairs to {os.path.join(args.out, 'pairs.jsonl')}")


if __name__ == "__main__":
    main()
