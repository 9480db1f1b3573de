"""sample.py: deterministic per seed, equal to the stock diffusers pipelines, and a CLI that
writes what it says."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
from plumbing import lora
from plumbing.images import tensor_to_uint8
from plumbing.images import toy_prompts
import sample as S

P0, P1 = "a red circle on a black background", "a blue square on a white background"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on a busy 2-core
    machine OpenMP threads spinning against other processes made this file 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stock_pipeline(m, unet, scheduler):
    """diffusers' own StableDiffusion(XL)Pipeline around the preset's encoders and VAE."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=unet, scheduler=scheduler)
    if m.xl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=m.text_encoders[1], tokenizer_2=m.tokenizers[1],
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_same_seed_same_image_whatever_the_batch_and_other_seeds_differ(name):
    m = M.load_models(name, reference=False)
    a = S.generate(m, [P0, P1], [0, 1, 2], steps=3, guidance=5.0, batch_size=8)
    b = S.generate(m, [P0, P1], [0, 1, 2], steps=3, guidance=5.0, batch_size=8)
    assert a.shape == (6, 3, m.resolution, m.resolution) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)  # bit-identical: no global RNG, no state left in a scheduler
    # One image per call (and batches that split the prompts unevenly) give the same pixels:
    # the noise is drawn per image, and the XL unconditional half is built per batch. Only
    # float rounding of batched kernels differs, ~1e-6 -- except that the *untrained* pixel-space
    # UNet's x0 = (x_t - sqrt(1-ᾱ)ε)/sqrt(ᾱ) at ᾱ_999 ≈ 4e-5 magnifies it ~150x (seen: 4e-5).
    # Noise drawn per batch instead would differ by O(1) either way.
    tol = 5e-4 if m.vae is None else 1e-5
    assert (S.generate(m, [P0, P1], [0, 1, 2], steps=3, guidance=5.0, batch_size=1) - a).abs().max() < tol
    assert (S.generate(m, [P0, P1], [0, 1, 2], steps=3, guidance=5.0, batch_size=4) - a).abs().max() < tol
    # prompt-major order: image 4 is (P1, seed 1)
    assert (S.generate(m, [P1], [1], steps=3, guidance=5.0) - a[4:5]).abs().max() < tol
    for i, j in [(0, 1), (0, 2), (3, 4)]:  # same prompt, different seeds
        assert (a[i] - a[j]).abs().max() > 0.1
    assert m.unet.training  # generate() puts the UNet in eval and back


def perturbed_unet_dir(m, path):
    """The preset's UNet nudged away from its init (so loading the saved one is tested), saved
    the way train.py saves it."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.05 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    m.unet.save_pretrained(os.path.join(path, "unet"))
    return path


@pytest.mark.parametrize("name,scheduler", [("tiny-sd", "ddim"), ("tiny-xl", "ddim"), ("tiny-sd", "euler"),
                                            ("tiny-xl", "dpm")])
def test_saved_unet_in_stock_pipeline_gives_the_same_image(tmp_path, name, scheduler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    unet_dir = perturbed_unet_dir(M.load_models(name, reference=False), str(tmp_path))
    m = M.load_models(name, init_unet=unet_dir, reference=False)  # what sample.py --unet does
    ours = S.generate(m, [P0], [3], steps=5, guidance=5.0, scheduler=scheduler)

    sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
    pipe = stock_pipeline(m, UNet2DConditionModel.from_pretrained(os.path.join(unet_dir, "unet")),
                          sched_cls.from_config(m.scheduler.config))
    stock = pipe(prompt=P0, num_inference_steps=5, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                 output_type="pt", height=m.resolution, width=m.resolution).images  # [0, 1]
    assert stock.shape == ours.shape
    assert ((ours + 1) / 2 - stock).abs().max() < 1e-4
    assert ((stock > 0.001) & (stock < 0.999)).float().mean() > 0.5  # not a saturated image equal by clamping
    # ...and the saved weights matter: the preset's own UNet gives another image.
    init = S.generate(M.load_models(name, reference=False), [P0], [3], steps=5, guidance=5.0, scheduler=scheduler)
    assert ((init + 1) / 2 - stock).abs().max() > 1e-3


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cli_writes_pngs_jsonl_grid_and_compare(tmp_path, capsys):
    out = str(tmp_path / "run")
    S.main(["--model", "tiny", "--prompts", f"{P0}|{P1}", "--seeds", "0-1", "--steps", "4", "--out", out])
    rows = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert [(r["prompt"], r["seed"]) for r in rows] == [(P0, 0), (P0, 1), (P1, 0), (P1, 1)]
    assert all(r["model"] == "tiny" and r["unet"] is None and r["steps"] == 4 and r["guidance"] == 7.5
               and r["scheduler"] == "ddim" for r in rows)
    assert [r["file"] for r in rows] == ["0000_seed0.png", "0001_seed1.png", "0002_seed0.png", "0003_seed1.png"]
    expected = tensor_to_uint8(S.generate(M.load_models("tiny", reference=False), [P0, P1], [0, 1], steps=4))
    pngs = np.stack([np.asarray(Image.open(os.path.join(out, r["file"]))) for r in rows])
    assert np.array_equal(pngs, expected)
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (2 * 16 * 4, 2 * 16 * 4, 3)  # default --grid_scale 4 for 16-px images
    # rows = prompts, cols = seeds; nearest-neighbour upscale: every 4th pixel is the original
    tiled = expected.reshape(2, 2, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(32, 32, 3)
    assert np.array_equal(grid[::4, ::4], tiled)

    # --compare with the same folder: every (prompt, seed) matches (--resume: its images are kept, as they are)
    capsys.readouterr()
    S.main(["--model", "tiny", "--prompts", f"{P0}|{P1}", "--seeds", "0-1", "--steps", "4", "--out", out,
            "--compare", out, "--grid_scale", "2", "--resume"])
    assert "0 missing" in capsys.readouterr().out
    cmp_img = np.asarray(Image.open(os.path.join(out, "compare.png")))
    assert cmp_img.shape == (2 * 16 * 2, 2 * 2 * 16 * 2, 3)  # each cell: base | tuned
    cells = cmp_img[::2, ::2]
    assert np.array_equal(cells[:16, :16], expected[0]) and np.array_equal(cells[:16, 16:32], expected[0])
    assert np.array_equal(cells[16:, 32:48], expected[3]) and np.array_equal(cells[16:, 48:64], expected[3])

    # a run with an extra seed: its two new images have no base and stay black
    out2 = str(tmp_path / "run2")
    S.main(["--model", "tiny", "--prompts", f"{P0}|{P1}", "--seeds", "0-2", "--steps", "4", "--out", out2,
            "--compare", out])
    printed = capsys.readouterr().out
    assert "2 missing" in printed and "warning" not in printed
    cmp2 = np.asarray(Image.open(os.path.join(out2, "compare.png")))[::4, ::4]
    assert cmp2.shape == (2 * 16, 3 * 2 * 16, 3)
    assert np.array_equal(cmp2[16:, 32:48], expected[3]) and np.array_equal(cmp2[16:, 48:64], expected[3])
    assert cmp2[:, :64].max() > 0 and cmp2[:, 64:].max() == 0  # the seed-2 column is black

    # other sampler settings than the base run's are pointed out
    S.main(["--model", "tiny", "--prompts", P0, "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "run3"),
            "--compare", out])
    assert "sampled with steps 4, this run with 2" in capsys.readouterr().out


def test_prompt_and_seed_parsing(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(f"{P0}\n\n  {P1}  \n{P0}\n")
    assert S.read_prompts(str(f)) == [P0, P1]  # blank lines skipped, stripped, duplicates dropped
    assert S.read_prompts(f"{P0} | {P1}|") == [P0, P1]
    assert S.read_prompts("toy-test") == toy_prompts("test") and len(S.read_prompts("toy-all")) == 72
    assert S.parse_seeds("0-3") == [0, 1, 2, 3] and S.parse_seeds("0,5,7") == [0, 5, 7] and S.parse_seeds("2") == [2]


def test_a_missing_prompts_file_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        S.main(["--prompts", str(tmp_path / "missing_prompts.txt"), "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"--prompts {tmp_path / 'missing_prompts.txt'}: no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--prompts", "{tmp}/empty.txt"], "no prompts"),
    (["--prompts", " | "], "no prompts"),
    (["--compare", "{tmp}/nowhere"], "nowhere"),
])
def test_bad_inputs_end_with_one_line(tmp_path, argv, needle):
    (tmp_path / "empty.txt").write_text("\n \n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as err:
        S.main(argv)
    msg = str(err.value)
    assert msg.startswith("error: ") and needle in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()  # failed before sampling


@pytest.mark.parametrize("seeds", ["a", "3-1", "1,,2", "0-2,1", "-1"])
def test_bad_seeds_are_an_argparse_error(tmp_path, capsys, seeds):
    with pytest.raises(SystemExit) as err:
        S.main(["--seeds", seeds, "--out", str(tmp_path)])
    assert err.value.code == 2 and "--seeds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# --lora, --unet from the hub, --negative_prompt
def fuse_by_hand(unet, lora_dir):
    """W += (alpha/r)·up·down for every adapted layer, read straight from the safetensors file and
    its diffusers metadata: no diffusers or peft code involved."""
    from safetensors import safe_open
    with safe_open(os.path.join(lora_dir, lora.LORA_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        weights = {k: f.get_tensor(k) for k in f.keys()}
    scale = meta["unet.lora_alpha"] / meta["unet.r"]
    layers = dict(unet.named_modules())
    with torch.no_grad():
        for key, down in weights.items():
            if key.endswith(".lora.down.weight"):
                name = key.removeprefix("unet.").removesuffix(".lora.down.weight")
                layers[name].weight += scale * weights[key.replace(".lora.down.", ".lora.up.")] @ down
    return len(weights) // 2


def test_lora_flag_samples_the_fused_unet(tmp_path):
    import train
    run = tmp_path / "lora-run"
    # --lr 1e-2: at the default 2e-5, 3 steps move the adapter too little to tell the images apart
    train.main(["--model", "tiny", "--lora_rank", "4", "--lora_alpha", "8", "--max_steps", "3", "--batch_size", "4",
                "--lr", "1e-2", "--no_progress", "--out_dir", str(run)])
    out = str(tmp_path / "samples")
    got = S.main(["--model", "tiny", "--lora", str(run / "lora"), "--prompts", f"{P0}|{P1}", "--seeds", "0-1",
                  "--steps", "4", "--out", out])
    m = M.load_models("tiny", reference=False)
    base = tensor_to_uint8(S.generate(m, [P0, P1], [0, 1], steps=4))
    assert fuse_by_hand(m.unet, str(run / "lora")) == 32  # 4 transformer blocks x 2 attentions x 4 projections
    fused = tensor_to_uint8(S.generate(m, [P0, P1], [0, 1], steps=4))
    assert np.abs(got.astype(int) - fused).max() <= 1  # float rounding of the merge order, at most
    assert np.abs(got.astype(int) - base).mean() > 5  # and the LoRA does change the images
    rows = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert all(r["lora"] == str(run / "lora") and r["unet"] is None for r in rows)


def fake_hub_cache(hf_home, repo, unet, subfolder):
    """`unet` saved into a Hugging Face cache laid out as a download of `repo` leaves it (a pipeline
    repo: subfolder "unet"; a UNet-only repo: ""), so that HF_HUB_OFFLINE=1 finds it there."""
    root = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    rev = "0" * 40
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(rev)
    unet.save_pretrained(os.path.join(root, "snapshots", rev, subfolder))


def test_unet_hub_id_loads_its_unet_subfolder_or_its_root(tmp_path):
    import subprocess
    import sys
    m = M.load_models("tiny", reference=False)
    unet_dir = perturbed_unet_dir(m, str(tmp_path / "local"))  # m.unet is now the perturbed UNet
    hf_home = str(tmp_path / "hf")
    fake_hub_cache(hf_home, "someone/pipeline-repo", m.unet, "unet")
    fake_hub_cache(hf_home, "someone/unet-repo", m.unet, "")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=hf_home)
    want = tensor_to_uint8(S.generate(M.load_models("tiny", init_unet=unet_dir, reference=False), [P0], [0],
                                           steps=3))
    for repo in ("someone/pipeline-repo", "someone/unet-repo"):
        out = str(tmp_path / repo.split("/")[1])
        r = subprocess.run([sys.executable, os.path.abspath(S.__file__), "--model", "tiny", "--unet", repo,
                            "--prompts", P0, "--seeds", "0", "--steps", "3", "--out", out],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        got = np.asarray(Image.open(os.path.join(out, "0000_seed0.png")))
        assert np.abs(got.astype(int) - want[0]).max() <= 1, repo


def test_negative_prompt_replaces_the_empty_prompt(tmp_path):
    m = M.load_models("tiny", reference=False)
    default = S.generate(m, [P0], [0, 1], steps=3, guidance=7.5)
    assert torch.equal(S.generate(m, [P0], [0, 1], steps=3, guidance=7.5, negative_prompt=""), default)
    assert (S.generate(m, [P0], [0, 1], steps=3, guidance=7.5, negative_prompt=P1) - default).abs().max() > 0.1
    # without guidance there is no unconditional pass: nothing changes, and the CLI says so
    plain = S.generate(m, [P0], [0, 1], steps=3, guidance=1.0)
    assert torch.equal(S.generate(m, [P0], [0, 1], steps=3, guidance=1.0, negative_prompt=P1), plain)
    # the CLI: --negative_prompt "" is the default, recorded in samples.jsonl
    outs = {}
    for name, extra in (("none", []), ("empty", ["--negative_prompt", ""]), ("text", ["--negative_prompt", P1])):
        outs[name] = S.main(["--prompts", P0, "--seeds", "0", "--steps", "3", "--out", str(tmp_path / name), *extra])
        assert read_jsonl(tmp_path / name / "samples.jsonl")[0]["negative_prompt"] == (extra[1] if extra else None)
    assert np.array_equal(outs["none"], outs["empty"]) and not np.array_equal(outs["none"], outs["text"])


@pytest.mark.parametrize("name,negative", [("tiny-sd", P1), ("tiny-xl", P1), ("tiny-xl", "")])
def test_negative_prompt_equals_the_stock_pipeline(name, negative):
    # SDXL: as in its pipeline, "" is encoded like any text, only None means zeros
    from diffusers import DDIMScheduler
    m = M.load_models(name, reference=False)
    ours = S.generate(m, [P0], [3], steps=4, guidance=5.0, negative_prompt=negative)
    pipe = stock_pipeline(m, m.unet.eval(), DDIMScheduler.from_config(m.scheduler.config))
    stock = pipe(prompt=P0, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator("cpu").manual_seed(3), height=m.resolution, width=m.resolution).images
    assert ((ours + 1) / 2 - stock).abs().max() < 1e-4
    assert (S.generate(m, [P0], [3], steps=4, guidance=5.0) - ours).abs().max() > 1e-3  # it did matter
