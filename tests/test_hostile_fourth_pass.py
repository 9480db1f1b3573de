"""A fourth hostile pass over train.py and what it reads, a class each: numbers whose size alone
exhausts memory (--resolution, --num_items), a --logging_dir that leads out of --out_dir, a path
the file system cannot even look up (a name over 255 bytes) in a manifest or as --data, a parquet
column mapping that names one column for two roles (winner=a,loser=a: pairs of one image), a
cache index whose values are of the right type but wrong (a VAE scale of 0 or nan, a count that
is a boolean, a shard outside the cache), a --resume that changes the reference model or the data
and E5 settings that only a note mentioned, an --out_dir whose name holds a control character,
and validation grids too large to hold. Each ends in one line (no traceback), a counted skip, or
the right result, before anything heavy loads."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import train
from conftest import finished_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--no_progress", "--num_items", "4", "--batch_size", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def argparse_line(argv, capsys):
    """The one line a refusal of train.parse_args ends in (argparse's, exit 2)."""
    with pytest.raises(SystemExit) as err:
        train.parse_args(argv)
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def cli(*argv, cwd=ROOT):
    """python train.py ARGV as a user runs it: (exit code, stdout + stderr)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------
# 1. Flags: sizes that exhaust memory, a log folder outside --out_dir

@pytest.mark.parametrize("flags, message", [
    (["--resolution", "8192"], "--resolution must be at most 4096 (each image is held and rendered at that size), "
                               "not 8192"),
    (["--num_items", "2147483647"], "--num_items must be at most 10000000 (an epoch's order is held in memory), "
                                    "not 2147483647"),
    (["--report_to", "tensorboard", "--logging_dir", "/tmp/elsewhere"],
     "--logging_dir '/tmp/elsewhere': name a folder inside --out_dir (e.g. logs); a run writes only there"),
    (["--report_to", "tensorboard", "--logging_dir", "a/../../up"],
     "--logging_dir 'a/../../up': name a folder inside --out_dir (e.g. logs); a run writes only there"),
    (["--data_split", "validation"], "--data_split 'validation': the toy sets' prompt splits are train, test and all"),
    (["--data", "toy-base", "--loss", "sft", "--data_split", ""],
     "--data_split '': the toy sets' prompt splits are train, test and all"),
    (["--report_to", "tensorboard", "--logging_dir", ""],
     "--logging_dir '': name a folder inside --out_dir (e.g. logs); a run writes only there"),
])
def test_sizes_and_log_folders_refused_before_anything_loads(flags, message, capsys):
    # Before: --resolution 100000 died in render_toy (MemoryError traceback, 149 GiB), --num_items 2**31-1 in
    # torch.randperm (16 GiB), both after the models loaded; --logging_dir /abs or ../x wrote TensorBoard's
    # files outside --out_dir; --data_split of the toy sets ended in "error: toy_prompts: split must be ...", a
    # name the user never typed.
    assert argparse_line(FAST + flags, capsys).endswith(f": error: {message}")  # (argparse names the program)


def test_log_folders_inside_out_dir_and_unused_ones_are_accepted():
    train.parse_args(["--report_to", "tensorboard", "--logging_dir", "tb/run1", *FAST])
    train.parse_args(["--logging_dir", "/not/used/without/tensorboard", *FAST])
    train.parse_args([*FAST, "--resolution", "4096", "--num_items", "10000000"])


# ---------------------------------------------------------------------------------------
# 2. Manifests and parquet mappings: names the file system cannot look up, one column in two roles

def manifest(tmp_path, rows, n=4):
    """tmp_path/m.jsonl: ROWS, then n good pairs of 20x20 PNGs."""
    os.makedirs(tmp_path / "img", exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}w.png")
        Image.new("RGB", (20, 20), (0, 40 * i, 0)).save(tmp_path / "img" / f"{i}l.png")
    good = [{"prompt": f"p{i}", "winner": f"img/{i}w.png", "loser": f"img/{i}l.png"} for i in range(n)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + good))
    return str(tmp_path / "m.jsonl")


def test_an_image_name_over_255_bytes_is_a_counted_missing_image(tmp_path, capsys):
    # Before: pathlib's is_file raised OSError (errno 36, File name too long): a traceback for one line.
    path = manifest(tmp_path, [{"prompt": "p", "winner": "a" * 300 + ".png", "loser": "img/0l.png"}])
    ds = train.data.ManifestPairs(path, 16)
    assert len(ds) == 4 and ds.skip_counts == {"missing_image": 1}
    assert f"warning: {path}: skipped 1 lines with a missing image file (first: {path}:1 'aaa" in capsys.readouterr().err


def test_a_manifest_name_over_255_bytes_is_one_line(tmp_path):
    code, out = cli("--data", str(tmp_path / ("b" * 300 + ".jsonl")), "--out_dir", str(tmp_path / "o"), *FAST)
    assert code == 1 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == f"error: manifest not found: {tmp_path / ('b' * 300 + '.jsonl')}"


@pytest.mark.parametrize("mapping, column", [("prompt=caption,winner=jpg_0,loser=jpg_0", "jpg_0"),
                                              ("prompt=caption,images=jpg_0+jpg_0,label=label_0", "jpg_0"),
                                              ("prompt=caption,images=jpg_0+jpg_1,label=caption", "caption"),
                                              ("prompt=jpg_1,winner=jpg_0,loser=jpg_1", "jpg_1")])
def test_a_mapping_that_names_one_column_twice_is_refused(mapping, column):
    # Before: winner=jpg_0,loser=jpg_0 trained on pairs of one image without a word.
    from plumbing import pickapic
    with pytest.raises(ValueError) as err:
        pickapic.parse_schema(mapping)
    assert str(err.value) == (f"--data ...#{mapping}: column {column} is named for two roles; each of prompt, the "
                              f"two images and the label needs its own column")
    assert pickapic.parse_schema("prompt=caption,images=jpg_0+jpg_1,label=label_0").images == ("jpg_0", "jpg_1")


# ---------------------------------------------------------------------------------------
# 3. Cache indexes: values of the right JSON type that are still wrong

@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    from tools import build_cache
    folder = tmp_path_factory.mktemp("cache") / "c"
    build_cache.build_cache("tiny", "toy", str(folder), num_items=4, dtype="fp32", shard_size=4, batch_size=2,
                            progress=False)
    return folder


@pytest.mark.parametrize("change, message", [
    ({"vae_scale": float("nan")}, "cache index 'vae_scale' is nan, not a positive finite number"),
    ({"vae_scale": 0}, "cache index 'vae_scale' is 0, not a positive finite number"),
    ({"vae_scale": True}, "cache index 'vae_scale' is True, of the wrong type"),
    ({"num_pairs": False}, "cache index 'num_pairs' is False, of the wrong type"),
    ({"skip_counts": {"tie": "3"}}, "cache index 'skip_counts' {'tie': '3'} are not counts (whole numbers >= 0)"),
    ({"shards": [{"file": "../elsewhere/shard-00000.safetensors", "num_pairs": 4}]},
     "cache index shard entry {'file': '../elsewhere/shard-00000.safetensors', 'num_pairs': 4} is not "
     '{"file": NAME (in the cache folder), "num_pairs": N >= 0}'),
    ({"shards": [{"file": "/etc/hostname", "num_pairs": 4}]},
     "cache index shard entry {'file': '/etc/hostname', 'num_pairs': 4} is not "
     '{"file": NAME (in the cache folder), "num_pairs": N >= 0}'),
    ({"shards": [{"file": "shard-00000.safetensors", "num_pairs": True}]},
     "cache index shard entry {'file': 'shard-00000.safetensors', 'num_pairs': True} is not "
     '{"file": NAME (in the cache folder), "num_pairs": N >= 0}'),
])
def test_cache_index_values_that_are_wrong_are_one_line(built_cache, tmp_path, change, message):
    # Before: a vae_scale of nan trained five bad steps and stopped, one of 0 trained on blank latents without a
    # word; a shard named ../x or /x was read from outside the cache; True passed for a count.
    folder = tmp_path / "c"
    shutil.copytree(built_cache, folder)
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(dict(index, **change)))
    from plumbing import cache
    with pytest.raises(ValueError) as err:
        cache.read_cache_index(str(folder))
    assert str(err.value) == f"{folder / 'index.json'}: {message}"


def test_a_cache_of_vae_scale_0_end_to_end(built_cache, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(built_cache, folder)
    index = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps(dict(index, vae_scale=0.0)))
    code, out = cli("--data", f"cache:{folder}", "--embed_model", "tiny", "--out_dir", str(tmp_path / "o"), *FAST)
    assert code == 1 and "Traceback" not in out
    assert out.strip().splitlines()[-1] == (f"error: {folder / 'index.json'}: cache index 'vae_scale' is 0.0, not a "
                                            f"positive finite number")
    assert not os.path.exists(tmp_path / "o" / "unet")


# ---------------------------------------------------------------------------------------
# 4. --resume: the reference model and what makes the data and E5 what they are

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run of RPO on the toy set: checkpoint-000001, checkpoint-000002, unet/."""
    out = finished_run(tmp_path_factory, 2)
    return out


def resume_line(finished, flags):
    from plumbing.checkpoint import check_resume_settings
    import loss as L
    ckpt = str(finished / "checkpoint-000002")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    args = train.parse_args(["--out_dir", str(finished), *FAST, *flags])
    with pytest.raises(SystemExit) as err:
        check_resume_settings(args, ckpt, state, L.settings_of(args.loss), 16, log=lambda *a: None)
    return err.value.code.replace(ckpt, "CKPT")


@pytest.mark.parametrize("flags, named", [
    (["--style", "sketch"], "--style winter, not sketch"),
    (["--data_split", "test"], "--data_split train, not test"),
    (["--embed_model", "toy-clip"], "--embed_model tiny, not toy-clip"),
])
def test_resume_refuses_another_data_or_e5(finished, flags, named):
    # Before: each was one note ("the command's settings replace the checkpoint's") and training went on with
    # another preferred style, other prompts or another CLIP for ω: the run's second half learnt something else.
    assert resume_line(finished, flags) == f"error: checkpoint CKPT was trained with {named} (pass " \
                                           f"--allow_changed_resume to continue anyway)"


def test_resume_refuses_another_pretrained_model_unless_changes_are_allowed(finished):
    # Before: --pretrained (the reference UNet, VAE and text encoders of sd15/sdxl) was not compared at all.
    # With --allow_changed_resume it goes through (the same model copied to another folder, say): a note.
    from plumbing.checkpoint import check_resume_settings
    assert resume_line(finished, ["--pretrained", "/models/other"]) == \
        "error: checkpoint CKPT was trained with --pretrained None, not /models/other (pass --allow_changed_resume " \
        "to continue anyway)"
    ckpt = str(finished / "checkpoint-000002")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    notes = []
    check_resume_settings(train.parse_args(["--pretrained", "/models/other", "--allow_changed_resume", *FAST]), ckpt,
                          state, [], 16, log=notes.append)
    assert notes == [f"note: continuing checkpoint {ckpt} (trained with --pretrained None) with --pretrained /models/other"]


def test_settings_the_data_does_not_read_may_change(finished, tmp_path):
    from plumbing.checkpoint import changed_settings, check_resume_settings
    ckpt = str(finished / "checkpoint-000002")
    state = json.load(open(os.path.join(ckpt, "state.json")))
    dpo = dict(state, args=dict(state["args"], loss="dpo", timesteps="pair"))
    args = train.parse_args(["--loss", "dpo", "--embed_model", "toy-clip", *FAST])  # DPO has no E5
    check_resume_settings(args, ckpt, dpo, ["beta", "timesteps"], 16, log=lambda *a: None)
    os.makedirs(tmp_path / "models" / "sd15")  # one folder named relative to the run's start, then absolute
    saved = dict(state, cwd=str(tmp_path), args=dict(state["args"], pretrained="models/sd15"))
    import loss as L
    check_resume_settings(train.parse_args(["--pretrained", str(tmp_path / "models" / "sd15"), *FAST]), ckpt, saved,
                          L.settings_of("rpo"), 16, log=lambda *a: None)
    assert changed_settings(state["args"], dict(state["args"], style="sketch", seed=5)) == ["--seed 5 (was 0)"]


def test_resume_with_another_style_end_to_end_changes_nothing(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = sorted(os.listdir(out))
    code, text = cli("--out_dir", str(out), "--resume", "--max_steps", "3", "--style", "sketch", *FAST)
    assert code == 1 and "Traceback" not in text
    assert text.strip().splitlines()[-1] == (f"error: checkpoint {out / 'checkpoint-000002'} was trained with --style "
                                             f"winter, not sketch (pass --allow_changed_resume to continue anyway)")
    assert sorted(os.listdir(out)) == before


# ---------------------------------------------------------------------------------------
# 5. An --out_dir whose name holds a control character

@pytest.mark.parametrize("name", ["run\nnext", "run\tx", "run\x1b[31m"])
def test_an_out_dir_with_a_control_character_is_refused_and_not_made(tmp_path, capsys, name):
    # Before: a newline in the name trained and split the final line ("done: ... UNet in /x/run" and "next/unet")
    # and the model card's lines; an escape sequence coloured the terminal.
    out = str(tmp_path / name)
    assert argparse_line(["--out_dir", out, *FAST], capsys).endswith(
        f": error: --out_dir {out!r}: the name holds a control character ({name[3]!r}); choose a plain name")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# 6. Validation grids too large to hold

def test_a_validation_grid_over_the_limit_is_refused_before_the_run(tmp_path, capsys):
    # Before: 20,000 prompts were sampled at the last step, all held in memory for one grid, before the final
    # checkpoint was saved (at 512 px and beyond, memory ran out there and the last steps were lost).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(600)))
    assert argparse_line(["--validation_prompts", str(prompts), "--validation_seeds", "0-1", *FAST], capsys).endswith(
        ": error: --validation_prompts × --validation_seeds make 600 × 2 = 1200 images; a validation grid holds at "
        "most 1024: pass fewer prompts or seeds (sample.py makes any number from a checkpoint)")
    args = train.parse_args(["--validation_prompts", str(prompts), "--validation_seeds", "0", *FAST])
    assert len(args.validation_prompts) == 600


# ---------------------------------------------------------------------------------------
# 7. Model folders that do not exist, found before the pipeline they are loaded after

@pytest.mark.parametrize("flags", [["--init", "/models/typo/unet"], ["--init", "unet"],
                                   ["--embed_model", "/models/clip-typo"], ["--embed_model", "b" * 300]])
def test_a_missing_init_or_embed_model_folder_is_refused_before_anything_loads(flags, capsys):
    # Before: --init is loaded after sd15's or sdxl's whole pipeline, --embed_model after the models: a typo cost
    # that load (and a name over 255 bytes ended in the hub client's "Repo id must be in the form ...").
    assert argparse_line([*FAST, *flags], capsys).endswith(
        f": error: {flags[0]} {flags[1]}: no such folder (nor a hub id of the form owner/name)")


def test_special_names_hub_ids_and_folders_pass_the_early_look(tmp_path):
    for flags in (["--embed_model", "toy-clip"], ["--embed_model", "tiny"], ["--embed_model", "openai/clip-vit-base-patch32"],
                  ["--init", "someone/unet-repo"], ["--init", str(tmp_path)]):
        train.parse_args([*FAST, *flags])


# ---------------------------------------------------------------------------------------
# --overwrite deletes the earlier run only once the new run's data and models have loaded

@pytest.mark.parametrize("bad", ["data", "init"])
def test_overwrite_keeps_the_earlier_run_when_the_new_runs_inputs_fail(finished, tmp_path, bad):
    # Before: check_out_dir deleted the run first; a manifest with no usable pair, or an --init folder
    # without weights, then stopped the new run with the old one gone.
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
    (tmp_path / "bad.jsonl").write_text('not json\n{"prompt": "a", "winner": "no.png", "loser": "no2.png"}\n')
    os.makedirs(tmp_path / "badinit")
    (tmp_path / "badinit" / "config.json").write_text("{}")
    flags = ["--data", str(tmp_path / "bad.jsonl")] if bad == "data" else ["--init", str(tmp_path / "badinit")]
    code, output = cli("--out_dir", str(out), "--overwrite", "--max_steps", "2", *FAST, *flags)
    assert code == 1 and "Traceback" not in output and output.strip().splitlines()[-1].startswith("error: ")
    assert "deleted" not in output
    if bad == "init":  # (one line: diffusers' own error log before it is silenced, plumbing/hub.quiet)
        assert len(output.strip().splitlines()) == 1, output
    assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before
    code, output = cli("--out_dir", str(out), "--overwrite", "--max_steps", "1", *FAST)  # (and a good one replaces it)
    assert code == 0 and f"--overwrite: deleted the run in {out} (checkpoint-000002, checkpoint-000001, " \
                          f"metrics.jsonl, unet, args.json, README.md)" in output
    assert sorted(os.listdir(out)) == ["README.md", "args.json", "checkpoint-000001", "metrics.jsonl", "unet"]


# ---------------------------------------------------------------------------------------
# A JPEG stored sideways with an EXIF orientation (a phone's photo) trains upright

@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_as_a_viewer_applies_it(tmp_path, orientation):
    # Before: the pixels were read as stored, so a phone's portrait photo trained lying on its side.
    from PIL import ImageOps
    from plumbing.image_files import read_image
    stored = Image.new("RGB", (48, 24))
    stored.paste((250, 0, 0), (0, 0, 24, 12))  # one red corner: every transpose puts it elsewhere
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # (PIL's own reading, independent)
    img, refused = read_image(str(path))
    assert refused is None and img.size == expected.size
    assert img.info["original_size"] == expected.size
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    small, _ = read_image(str(path), resolution=4)  # (decoded at a smaller scale: the same way up)
    assert small.info["original_size"] == expected.size and (small.size[0] > small.size[1]) == (expected.size[0] > expected.size[1])


@pytest.mark.parametrize("flag, used", [([], 5.0), (["--validation_guidance", "0"], 0.0),
                                        (["--validation_guidance", "2.5"], 2.5)])
def test_validation_guidance_0_is_used_not_replaced_by_the_default(tmp_path, monkeypatch, flag, used):
    # Before: `args.validation_guidance or default`: 0 (no guidance, accepted by the checks) sampled at 5.
    import sample
    seen = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda m, prompts, seeds, steps, guidance, **kw: seen.append(guidance) or
                        real(m, prompts, seeds, steps, guidance, **kw))
    (tmp_path / "p.txt").write_text("a red circle on a white background\n")
    train.main(["--max_steps", "1", "--validation_prompts", str(tmp_path / "p.txt"), "--validation_seeds", "0",
                "--validation_inference_steps", "2", "--out_dir", str(tmp_path / "o"), *FAST, *flag])
    assert seen == [used]
