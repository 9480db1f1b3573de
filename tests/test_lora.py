"""LoRA (--lora_rank): the reference is the adapter-free UNet, only adapters train, the saved
file is the diffusers LoRA format that the stock pipelines load, and train.py resumes it exactly."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs peft (pip install -r requirements.txt)")

import model as M
from plumbing import lora, tiny
import train

PROMPTS = ["a red circle on a black background", "a blue square on a white background"]


def inputs(m, seed=0, B=2):
    """A fixed UNet input for preset m: noisy latents, timesteps, text conditioning."""
    g = torch.Generator().manual_seed(seed)
    C, S = m.unet.config.in_channels, m.unet.config.sample_size
    return torch.randn(B, C, S, S, generator=g), torch.tensor([10, 700][:B]), M.encode_prompts(m, PROMPTS[:B])


@torch.no_grad()
def predict(unet, x, t, cond):
    return M.predict_noise(unet, x, t, cond).float()


def perturb_adapter(m, seed=0, scale=0.1):
    """Move every adapter tensor off its init (B = 0 there, so the adapter would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)

DPO = train.parse_args(["--loss", "dpo", "--timesteps", "pair"])


def encoded(latents, cond):
    """An already-encoded micro-batch (train.model_inputs passes it through)."""
    return {"prompt": PROMPTS, "latents": latents, "cond": cond}


def dpo_step(m, optimizer, seed=1):
    """One train.micro_batch_loss (DPO) step on random [winners; losers] latents."""
    g = torch.Generator().manual_seed(seed)
    C, S = m.unet.config.in_channels, m.unet.config.sample_size
    latents = torch.randn(4, C, S, S, generator=g)
    cond = M.encode_prompts(m, PROMPTS, repeat=2)
    loss, _ = train.micro_batch_loss(m, encoded(latents, cond), g, DPO)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_reference_is_the_base_unet_before_and_after_a_step(name):
    m = M.load_models(name, lora_rank=4)
    base = M.load_models(name, reference=False)  # a fresh UNet without any adapter
    assert m.lora and m.ref_unet is None
    x, t, cond = inputs(m)
    want = predict(base.unet, x, t, cond)
    with M.reference_unet(m) as ref:
        assert ref is m.unet  # the same module: no second UNet in memory
        assert torch.equal(predict(ref, x, t, cond), want)
    assert torch.equal(predict(m.unet, x, t, cond), want)  # B = 0 at init: policy == reference
    optimizer = torch.optim.AdamW([p for p in m.unet.parameters() if p.requires_grad], lr=1e-2)
    dpo_step(m, optimizer)
    with M.reference_unet(m) as ref:
        assert torch.equal(predict(ref, x, t, cond), want)
    assert (predict(m.unet, x, t, cond) - want).abs().max() > 1e-4  # the adapter is back on, and moved


def test_only_the_adapter_trains_and_one_step_changes_only_it():
    m = M.load_models("tiny-xl", lora_rank=4)
    names = {n for n, p in m.unet.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(p.requires_grad for n, p in m.unet.named_parameters() if ".lora_" in n)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in m.unet.parameters() if p.requires_grad], lr=1e-2)
    dpo_step(m, optimizer)
    changed = {k for k, v in m.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)  # every base tensor bit-identical
    assert {k for k in before if ".lora_B." in k} <= changed  # the B's got the gradient (A·0 = 0 for A)
    # the adapter is still trainable after the reference forward switched it off and on
    assert {n for n, p in m.unet.named_parameters() if p.requires_grad} == names


def test_bf16_keeps_the_frozen_base_in_bf16_and_the_adapter_in_fp32():
    m = M.load_models("tiny", lora_rank=4, mixed_precision="bf16")
    dtypes = {}
    for p in m.unet.parameters():
        dtypes.setdefault(p.requires_grad, set()).add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}} and m.ref_unet is None
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 3, 16, 16, generator=g)
    loss, _ = train.micro_batch_loss(m, encoded(latents, M.encode_prompts(m, PROMPTS, repeat=2)), g, DPO,
                                     autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    loss.backward()
    grads = [p.grad for p in m.unet.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_switching_the_adapter_off_for_the_reference_keeps_the_policy_gradient(checkpointing):
    # The policy forward runs with the adapter on, the reference forward (no grad) with it off,
    # then backward. Same computation with the reference from a separate base UNet instead:
    # the adapter's gradients must be identical (not None: peft's switch also toggles
    # requires_grad, and a leaf without it at backward time gets no gradient at all).
    m = M.load_models("tiny", lora_rank=4, gradient_checkpointing=checkpointing)
    perturb_adapter(m)  # policy != reference, and A gets a gradient too (B != 0)
    separate = SimpleNamespace(**vars(m))
    separate.lora, separate.ref_unet = False, M.load_models("tiny", reference=False).unet.eval()
    grads = []
    for mm in (m, separate):
        g = torch.Generator().manual_seed(3)
        latents = torch.randn(4, 3, 16, 16, generator=g)
        loss, _ = train.micro_batch_loss(mm, encoded(latents, M.encode_prompts(m, PROMPTS, repeat=2)), g, DPO)
        loss.backward()
        grads.append([p.grad.clone() for p in m.unet.parameters() if p.requires_grad])
        m.unet.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(a.abs().sum() > 0 for a in grads[0])


def stock_pipeline(name):
    """The stock diffusers pipeline around a tiny preset's fresh (adapter-free) components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    preset = M.PRESETS[name]
    parts = tiny.build_tiny(preset["xl"], preset["vae"])
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoders"][0], tokenizer=parts["tokenizers"][0],
                  unet=parts["unet"], scheduler=DDIMScheduler.from_config(parts["scheduler"].config))
    if preset["xl"]:
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=parts["text_encoders"][1],
                                         tokenizer_2=parts["tokenizers"][1], add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-xl"])
def test_saved_lora_loads_into_the_stock_pipeline(tmp_path, name):
    # alpha != rank: the scale alpha/rank must travel in the file's metadata, or a loader
    # would assume alpha = rank and the outputs below would differ
    m = M.load_models(name, lora_rank=4, lora_alpha=8, reference=False)
    perturb_adapter(m)
    lora.save_lora(m, str(tmp_path))
    assert os.listdir(tmp_path) == [lora.LORA_FILE]
    pipe = stock_pipeline(name)
    run = lambda: pipe(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, output_type="pt",
                       generator=torch.Generator().manual_seed(0), height=32, width=32).images
    plain = run()
    pipe.load_lora_weights(str(tmp_path))
    assert (run() - plain).abs().max() > 1e-3  # the LoRA changes the image
    x, t, cond = inputs(m)
    ours = predict(m.unet, x, t, cond)
    assert (predict(pipe.unet, x, t, cond) - ours).abs().max() < 1e-5  # ...into exactly our policy
    # and model.load_models(lora_dir=...) merges it into a plain UNet (what sample.py can use)
    fused = M.load_models(name, lora_dir=str(tmp_path), reference=False).unet
    assert not any(".lora_" in n for n, _ in fused.named_parameters())
    assert (predict(fused, x, t, cond) - ours).abs().max() < 1e-5


def test_train_writes_the_lora_and_resumes_to_the_same_weights(tmp_path):
    common = ["--lora_rank", "4", "--loss", "rpo", "--lr", "1e-3", "--num_items", "8", "--batch_size", "2",
              "--grad_accum", "2", "--no_progress", "--random_flip"]
    m = train.main(common + ["--max_steps", "4", "--out_dir", str(tmp_path / "straight")])
    assert sorted(os.listdir(tmp_path / "straight")) == ["README.md", "args.json", "checkpoint-000004", "lora",
                                                         "metrics.jsonl", "pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoint-000004")) == [
        "lora", "optimizer.safetensors", "rng.safetensors", "state.json"]  # no full unet/
    train.main(common + ["--max_steps", "2", "--out_dir", str(tmp_path / "split")])  # epoch boundary at 2
    train.main(common + ["--max_steps", "4", "--out_dir", str(tmp_path / "split"), "--resume"])
    a = load_file(tmp_path / "straight" / "lora" / lora.LORA_FILE)
    b = load_file(tmp_path / "split" / "lora" / lora.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(tmp_path / "straight" / "checkpoint-000004" / "optimizer.safetensors")
    ob = load_file(tmp_path / "split" / "checkpoint-000004" / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    # the file holds the trained adapter (which did move: B starts at 0) and nothing else
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora.up." in k)
    fresh = M.load_models("tiny", lora_rank=4, reference=False)
    lora.load_lora(fresh, str(tmp_path / "straight" / "lora"))
    assert all(torch.equal(x, y) for x, y in zip(fresh.unet.parameters(), m.unet.parameters()))
    # a resume with another rank is refused in one line
    with pytest.raises(SystemExit) as err:
        train.main(["--lora_rank", "8", *common[2:], "--max_steps", "5", "--out_dir", str(tmp_path / "split"),
                    "--resume"])
    assert "--lora_rank 4" in str(err.value) and "\n" not in str(err.value)


def test_missing_peft_ends_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SystemExit) as err:
        M.load_models("tiny", lora_rank=4)
    assert str(err.value) == "error: --lora_rank needs peft (pip install peft)"
