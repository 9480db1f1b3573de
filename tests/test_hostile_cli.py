"""User mistakes at the command line end in one line `error: ...` on stderr and exit code 1
(SystemExit with a message), never a traceback and never a silently wrong result. The cases of
the brief run the CLI in a subprocess, as a user runs it, offline (HF_HUB_OFFLINE=1, an empty
HF_HOME); the further cases call main() in this process (SystemExit with the same message), since
each subprocess pays the imports (5-10 s on a busy 2-core machine)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import evaluate as E
from plumbing import files
import model as M
from plumbing import lora
import sample as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(script, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, message):
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [message]  # that line and nothing else
    assert result.returncode == 1


def main_error(main, args):
    """The message that main(args) exits with (what the CLI prints as its one line)."""
    with pytest.raises(SystemExit) as err:
        main([str(a) for a in args])
    assert isinstance(err.value.code, str)  # a message, so the exit status is 1
    return err.value.code


def sample_out(tmp_path):
    """sample.py's --out for a failing case; it must not be created."""
    return tmp_path / "samples"


# ---------------------------------------------------------------------------------------
# sample.py


def test_sample_truncated_unet_weights(tmp_path):
    unet_dir = tmp_path / "run" / "unet"
    M.load_models("tiny", reference=False).unet.save_pretrained(unet_dir)
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:len(full) // 2])
    r = run_cli("sample.py", ["--unet", tmp_path / "run", "--out", sample_out(tmp_path)], tmp_path)
    assert_one_line_error(r, f"error: --unet {tmp_path / 'run'}: {weights} is truncated or corrupt "
                             f"({len(full) // 2} bytes where its header promises {len(full)}); copy or save it again")
    assert not sample_out(tmp_path).exists()


def test_sample_prompt_file_in_latin1(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle on a black background\nun café au lait\n".encode("latin-1"))
    r = run_cli("sample.py", ["--prompts", prompts, "--out", sample_out(tmp_path)], tmp_path)
    # line 2, column 7: the é, byte 0xe9 in latin-1 (two bytes in UTF-8)
    assert_one_line_error(r, f"error: {prompts}:2: not UTF-8 text (byte 0xe9 at column 7); save the file as UTF-8")
    assert not sample_out(tmp_path).exists()


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "prompts.txt"], "--prompts prompts.txt: no such file"),
    (["--prompts", "."], "--prompts . is a folder, not a file"),
    (["--guidance", "nan"], "--guidance must be a finite number from 0 to 100, not nan"),
])
def test_sample_a_missing_prompts_file_a_folder_or_nan_guidance_is_refused(tmp_path, argv, message):
    """Issue #28: these sampled the path itself as a prompt, or with a nan guidance; now argparse's
    usage and one error line, exit code 2, before a model loads."""
    r = run_cli("sample.py", [*argv, "--out", sample_out(tmp_path)], tmp_path)
    assert "Traceback" not in r.stderr and r.returncode == 2
    assert r.stderr.splitlines()[-1] == f"sample.py: error: {message}"
    assert not sample_out(tmp_path).exists()


def test_sample_prompt_file_with_a_utf8_bom_is_read_as_text(tmp_path):
    # not an error, but a silent-wrong-result trap: the BOM must not become part of prompt 1
    prompts = tmp_path / "prompts.tsv"
    prompts.write_bytes("\ufeffPrompt\tCategory\nun café\tFood\n".encode("utf-8"))
    assert S.read_prompts(str(prompts)) == ["un café"]


def test_sample_out_is_an_existing_file(tmp_path):
    existing = tmp_path / "results.png"
    existing.write_bytes(b"not a folder")
    r = run_cli("sample.py", ["--out", existing], tmp_path)
    assert_one_line_error(r, f"error: --out {existing} is a file, not a folder")
    assert existing.read_bytes() == b"not a folder"
    out = existing / "run"  # a folder below a file
    assert main_error(S.main, ["--out", out]) == f"error: --out {out}: {existing} is a file, not a folder"


def test_sample_unet_hub_id_offline(tmp_path):
    repo = "mhdang/dpo-sd1.5-text2image-v1"
    r = run_cli("sample.py", ["--unet", repo, "--out", sample_out(tmp_path)], tmp_path)
    assert_one_line_error(r, f"error: --unet {repo}: not a local folder, and it could not be downloaded from the "
                             f"Hugging Face hub (HF_HUB_OFFLINE is set and it is not in the local cache); download it "
                             f"where there is network (hf download {repo}) and pass its folder")


def test_sample_unet_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "rpo" / "unet"  # not owner/name: no hub look-up
    assert main_error(S.main, ["--unet", missing, "--out", sample_out(tmp_path)]) == \
        f"error: --unet {missing}: no such folder (nor a hub id of the form owner/name)"


def test_sample_unet_of_another_preset(tmp_path):
    M.load_models("tiny-xl", reference=False).unet.save_pretrained(tmp_path / "xl" / "unet")
    assert main_error(S.main, ["--model", "tiny", "--unet", tmp_path / "xl", "--out", sample_out(tmp_path)]) == (
        f"error: --unet {tmp_path / 'xl'} does not fit --model tiny: its in_channels is 4, the preset's 3; pass the "
        f"--model it was trained with")
    assert not sample_out(tmp_path).exists()


def test_sample_lora_of_another_preset(tmp_path):
    m = M.load_models("tiny-xl", lora_rank=4, reference=False)
    lora.save_lora(m, str(tmp_path / "xl-lora"))
    with safe_open(str(tmp_path / "xl-lora" / lora.LORA_FILE), "pt") as f:
        keys = list(f.keys())
    # tiny-xl's text states are 64-d, tiny's 32-d: the cross-attention key/value inputs differ
    bad = [k for k in keys if ".attn2.to_k.lora.down." in k or ".attn2.to_v.lora.down." in k]
    assert len(keys) == 64 and len(bad) == 8
    assert main_error(S.main, ["--model", "tiny", "--lora", tmp_path / "xl-lora", "--out", sample_out(tmp_path)]) == (
        f"error: --lora {tmp_path / 'xl-lora'}: 8 of 64 tensors fit no layer of this UNet (e.g. {bad[0]}); was it "
        f"trained on another --model or --unet?")
    assert not sample_out(tmp_path).exists()


def test_sample_lora_folder_without_the_file(tmp_path):
    (tmp_path / "lora").mkdir()
    assert main_error(S.main, ["--lora", tmp_path / "lora", "--out", sample_out(tmp_path)]) == (
        f"error: --lora {tmp_path / 'lora'}: no {lora.LORA_FILE} there (expected train.py --lora_rank's OUT_DIR/lora)")


# ---------------------------------------------------------------------------------------
# evaluate.py: only the listed images, only inside the folder, each one an image


def sample_folder(folder, n=3):
    """A folder as sample.py writes it: n PNGs, samples.jsonl, grid.png (never read)."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        for i in range(n):
            name = f"{i:04d}_seed{i}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(folder, name))
            f.write(json.dumps({"prompt": "a cat", "seed": i, "file": name}) + "\n")
    Image.new("RGB", (48, 16)).save(os.path.join(folder, "grid.png"))
    return folder


def set_file(folder, line, name):
    index = os.path.join(folder, "samples.jsonl")
    with open(index) as f:
        records = [json.loads(x) for x in f]
    records[line - 1]["file"] = name
    with open(index, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return index


def test_evaluate_listed_file_that_is_not_an_image(tmp_path):
    folder = sample_folder(str(tmp_path / "run"))
    with open(os.path.join(folder, "0001_seed1.png"), "w") as f:
        f.write("this is not a png\n")
    r = run_cli("evaluate.py", ["--images", folder, "--metrics", "clip"], tmp_path)
    assert_one_line_error(r, f"error: {folder}/samples.jsonl:2: 0001_seed1.png is not an image (cannot identify "
                             f"image file '{folder}/0001_seed1.png')")


def test_evaluate_listed_png_cut_short(tmp_path):
    # the header reads fine (read_index lets it through); decoding it, after the models load,
    # ends in one line naming the file all the same
    folder = sample_folder(str(tmp_path / "run"))
    path = os.path.join(folder, "0002_seed2.png")
    with open(path, "rb") as f:
        png = f.read()
    with open(path, "wb") as f:
        f.write(png[:len(png) // 2])
    assert len(files.read_index(folder)) == 3
    with pytest.raises(SystemExit) as err:
        files.open_rgb(path)
    assert err.value.code == f"error: {path}: not a readable image (OSError: image file is truncated)"


def test_evaluate_ignores_files_it_is_not_given(tmp_path):
    # the documented other half: files not listed in samples.jsonl are never opened
    folder = sample_folder(str(tmp_path / "run"))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image\n")
    records = files.read_index(folder)
    assert [os.path.basename(r["path"]) for r in records] == [f"{i:04d}_seed{i}.png" for i in range(3)]


def outside_message(index, line, name, folder):
    return (f"error: {index}:{line}: image path {name!r} points outside {folder}; evaluate.py reads only files "
            f"inside the folder it is given")


def test_evaluate_refuses_an_image_path_outside_the_folder(tmp_path):
    folder = sample_folder(str(tmp_path / "run"))
    index = set_file(folder, 2, "../../etc/hostname")
    r = run_cli("evaluate.py", ["--images", folder, "--metrics", "clip"], tmp_path)
    assert_one_line_error(r, outside_message(index, 2, "../../etc/hostname", folder))


@pytest.mark.parametrize("name", ["/etc/hostname", "link.png", "sub/../../secret.png"])
def test_evaluate_refuses_other_ways_out_of_the_folder(tmp_path, name):
    folder = sample_folder(str(tmp_path / "run"))
    outside = tmp_path / "secret.png"
    Image.new("RGB", (16, 16)).save(outside)  # a real image: the refusal must not depend on the content
    os.symlink(outside, os.path.join(folder, "link.png"))
    os.mkdir(os.path.join(folder, "sub"))
    index = set_file(folder, 2, name)
    assert main_error(E.main, ["--images", folder, "--metrics", "clip"]) == outside_message(index, 2, name, folder)
    # the toy metrics read folders through the same check, before the scorer trains
    cache = tmp_path / "scorer.safetensors"
    assert main_error(E.main, ["--images", folder, "--scorer_cache", cache]) == outside_message(index, 2, name, folder)
    assert not cache.exists()


def test_sample_compare_refuses_image_paths_outside_the_folder(tmp_path):
    # sample.py --compare reads an earlier run's folder the same way, before it samples
    folder = sample_folder(str(tmp_path / "base"))
    index = set_file(folder, 1, "../../etc/hostname")
    assert main_error(S.main, ["--compare", folder, "--out", sample_out(tmp_path)]) == \
        outside_message(index, 1, "../../etc/hostname", folder)
    assert not sample_out(tmp_path).exists()


def test_evaluate_samples_jsonl_in_latin1(tmp_path):
    folder = sample_folder(str(tmp_path / "run"))
    index = os.path.join(folder, "samples.jsonl")
    with open(index, "ab") as f:
        f.write('{"prompt": "un café", "seed": 9, "file": "0000_seed0.png"}\n'.encode("latin-1"))
    assert main_error(E.main, ["--images", folder, "--metrics", "clip"]) == \
        f"error: {index}:4: not UTF-8 text (byte 0xe9 at column 19); save the file as UTF-8"


@pytest.mark.parametrize("url,name", [
    ("https://github.com/x/y/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.pth"),
    ("https://evil.example/..%2F..%2F..%2Fetc%2Fcron.d%2Fjob", "job"),
    ("https://evil.example/a/..%5C..%5Cwin.ini", "win.ini"),
    ("https://evil.example/%2E%2E", "download"),
    ("https://evil.example/.bashrc?x=../../y", "bashrc"),
    ("https://evil.example/we%20ird%00name.pth", "we_ird_name.pth"),
])
def test_download_cache_path_stays_in_its_folder(tmp_path, url, name):
    cache = str(tmp_path / "checkpoints")
    path = files.url_cache_path(url, cache)
    assert os.path.dirname(path) == cache and path.endswith("-" + name)
    assert files.url_cache_path(url + "?v=2", cache) != path  # another URL, another file: no stale reuse
