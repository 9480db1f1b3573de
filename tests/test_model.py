"""model.py: the tiny presets build offline and behave like the real stack."""
import os
import subprocess
import sys

import pytest
import torch

import loss as L
import model as M
from plumbing import hub, speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_dpo_loss(m, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    R = m.resolution
    images = torch.rand(2 * B, 3, R, R, generator=g) * 2 - 1
    latents = M.encode_images(m, images, g)
    cond = M.encode_prompts(m, ["a red circle on a black background", "a blue square on a white background"][:B],
                            repeat=2)
    t = L.sample_timesteps(B, 1000, "pair", g).repeat(2)
    noise = L.sample_noise(latents[:B].shape, g).repeat(2, 1, 1, 1)
    noisy = m.scheduler.add_noise(latents, noise, t)
    err = L.denoising_error(M.predict_noise(m.unet, noisy, t, cond), noise)
    with torch.no_grad():
        ref = L.denoising_error(M.predict_noise(m.ref_unet, noisy, t, cond), noise)
    return L.dpo_loss(*err.chunk(2), *ref.chunk(2), 5000.0)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_tiny_presets_build_offline_with_the_real_component_classes(name):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    m = M.load_models(name)
    assert isinstance(m.unet, UNet2DConditionModel) and isinstance(m.scheduler, DDPMScheduler)
    assert all(isinstance(t, CLIPTokenizer) for t in m.tokenizers)
    assert isinstance(m.text_encoders[0], CLIPTextModel)
    if name == "tiny-xl":
        assert len(m.text_encoders) == 2 and isinstance(m.text_encoders[1], CLIPTextModelWithProjection)
        assert isinstance(m.vae, AutoencoderKL)
        assert m.unet.config.addition_embed_type == "text_time"
    else:
        assert m.vae is None and m.unet.config.in_channels == 3
    assert 0.5e6 < M.unet_size(m.unet) < 2e6
    # the frozen parts are the same in every process: built from a fixed seed
    again = M.load_models(name)
    assert torch.equal(next(m.text_encoders[0].parameters()), next(again.text_encoders[0].parameters()))
    assert torch.equal(next(m.unet.parameters()), next(again.unet.parameters()))
    # the policy starts equal to the reference: the loss is ln 2 (E3, docs/method.md)
    loss, _ = one_dpo_loss(m)
    assert loss.item() == pytest.approx(0.693147, abs=1e-3)


def test_xl_time_ids_come_from_each_images_size_and_crop():
    m = M.load_models("tiny-xl", reference=False)
    sizes = torch.tensor([[40, 64], [32, 32], [50, 70], [33, 48]])
    crops = torch.tensor([[3, 5], [0, 0], [3, 5], [0, 0]])
    cond = M.encode_prompts(m, ["a red circle on a black background", "a blue square on a gray background"], sizes,
                            crops, repeat=2)
    ids = cond["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[40, 64, 3, 5, 32, 32], [32, 32, 0, 0, 32, 32], [50, 70, 3, 5, 32, 32], [33, 48, 0, 0, 32, 32]]
    h = cond["encoder_hidden_states"]
    assert h.shape == (4, 16, 64)  # two 32-wide encoders concatenated
    assert torch.equal(h[0], h[2]) and not torch.equal(h[0], h[1])  # repeat=2: [prompts; prompts]
    pooled = cond["added_cond_kwargs"]["text_embeds"]
    assert pooled.shape == (4, 32) and torch.equal(pooled[1], pooled[3])


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_one_step_changes_policy_and_leaves_reference_bit_identical(name):
    m = M.load_models(name)
    ref_before = {k: v.clone() for k, v in m.ref_unet.state_dict().items()}
    pol_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    opt = torch.optim.AdamW(m.unet.parameters(), lr=1e-3)
    loss, _ = one_dpo_loss(m, seed=1)
    # at policy == reference the DPO gradient is (β/4)·∇Δ, not zero: one step must move the policy
    loss.backward()
    opt.step()
    assert all(torch.equal(v, ref_before[k]) for k, v in m.ref_unet.state_dict().items())
    assert all(not p.requires_grad for p in m.ref_unet.parameters())
    changed = sum(not torch.equal(v, pol_before[k]) for k, v in m.unet.state_dict().items())
    assert changed > len(pol_before) // 2


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for gc in (False, True):
        m = M.load_models("tiny-xl", gradient_checkpointing=gc)
        with torch.no_grad():  # move the policy off the reference so the DPO gradient is not ~0
            for p in m.unet.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
        loss, _ = one_dpo_loss(m, seed=2)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in m.unet.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-7)
    assert sum(g.abs().sum().item() for g in results[0][1]) > 0


def test_saved_unet_loads_with_stock_from_pretrained(tmp_path):
    from diffusers import UNet2DConditionModel
    m = M.load_models("tiny", reference=False)
    m.unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.unet.state_dict().values()))
    # and plumbing.hub.load_unet accepts the folder or its parent
    assert torch.equal(next(hub.load_unet(str(tmp_path)).parameters()), next(m.unet.parameters()))


def test_real_preset_without_weights_ends_with_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    # A real preset's default data is Pick-a-Pic v2 from the hub: checked first (before minutes of
    # model loading), and unreachable it says how to use local shards. Then the weights.
    for args, hint in ((["--model", "sdxl"], "--data hf:/path/to/folder"),
                       (["--model", "sdxl", "--data", "toy"], "--pretrained"),
                       (["--model", "sd15", "--pretrained", str(tmp_path / "missing"), "--data", "toy"], "--pretrained")):
        r = subprocess.run([sys.executable, "train.py", *args, "--no_progress"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and hint in last, last


def test_tiny_clip_embedder_is_deterministic_and_offline():
    clip_a, tok = M.load_embedder("tiny")
    clip_b, _ = M.load_embedder("tiny")
    assert torch.equal(next(clip_a.parameters()), next(clip_b.parameters()))
    assert tok(["a red circle"]).input_ids[0][:2] == [0, tok.convert_tokens_to_ids("a</w>")]


def test_auto_flags_resolve_per_device(monkeypatch):
    """--compile/--gradient_checkpointing/--sdpa_backend/... auto: the measured GPU configuration
    (regional compile, transformer:0.25 for full fine-tunes of real presets) on CUDA, off on the CPU."""
    import train
    monkeypatch.setattr(speed, "set_sdpa_backend", lambda name: None)  # (no GPU here)
    want = {("sdxl", 0, "cuda"): ("regional", "transformer:0.25", "bf16", "adamw_fused", "cudnn"),
            ("sd15", 0, "cuda:1"): ("regional", "transformer:0.25", "bf16", "adamw_fused", "cudnn"),
            ("sdxl", 8, "cuda"): ("regional", "none", "bf16", "adamw_fused", "cudnn"),
            ("tiny-xl", 0, "cuda"): ("regional", "none", "bf16", "adamw_fused", "cudnn"),
            ("sdxl", 0, "cpu"): ("none", "none", "no", "adamw", "default"),
            ("tiny", 0, "cpu"): ("none", "none", "no", "adamw", "default")}
    for (name, rank, device), expected in want.items():
        args = train.parse_args(["--model", name, "--lora_rank", str(rank)])
        speed.device_defaults(args, device, real=M.PRESETS[args.model]["pretrained"] is not None)
        got = (args.compile, args.gradient_checkpointing, args.mixed_precision, args.optimizer, args.sdpa_backend)
        assert got == expected, (name, rank, device, got)
    # explicit flags win
    args = train.parse_args(["--model", "sdxl", "--compile", "none", "--gradient_checkpointing"])
    speed.device_defaults(args, "cuda", real=M.PRESETS[args.model]["pretrained"] is not None)
    assert (args.compile, args.gradient_checkpointing) == ("none", "all")
