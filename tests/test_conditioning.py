"""What the UNet and the RPO weights are given, against the method and the stock pipelines:
E5 embeds a pair's own prompt whatever caption dropout does; a dropped caption gets the
unconditional input that sampling guides against (SD1.5: the encoding of "", SDXL: zeros), in the
raw and the cache paths; SDXL's time ids stay exact under bf16; the training conditioning and
sample.py's unconditional input equal diffusers' StableDiffusion(XL)Pipeline.encode_prompt."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import loss as L
import model as M
import train
from plumbing import cache
from plumbing import distributed as D
from tools import build_cache

PROMPTS = ["a red circle on a black background", "a blue square on a white background",
           "a green triangle on a grey background", "a yellow circle on a white background"]


def toy_batch(n=4):
    ds = data.build_dataset("toy", 16, num_items=16)
    return data.collate_pairs([ds[i] for i in range(n)])


def weights(m, batch, dropout, seed=3):
    args = train.parse_args(["--loss", "rpo", "--caption_dropout", str(dropout), "--embed", "mean"])
    _, cond, features = train.model_inputs(m, batch, torch.Generator().manual_seed(seed), args,
                                           D.Share(len(batch["prompt"])), M.load_embedder("tiny"))
    emb_w, emb_l = L.combine_features(*features, "mean", rows=2 * len(batch["prompt"])).chunk(2)
    return L.rpo_weights(emb_w, emb_l, 0.5), cond


def test_e5_weights_do_not_depend_on_caption_dropout():
    """The same batch and seed give the same ω with --caption_dropout 0 and 1; the UNet's text
    conditioning, not ω, is what dropout changes. (Before the fix, a dropped row's text feature
    was the empty prompt's: the 'before' weights below, which differ.)"""
    m, batch = M.load_models("tiny", reference=False), toy_batch()
    w0, cond0 = weights(m, batch, 0.0)
    w1, cond1 = weights(m, batch, 1.0)
    assert torch.equal(w0, w1)
    assert not torch.equal(cond0["encoder_hidden_states"], cond1["encoder_hidden_states"])
    clip, tok = M.load_embedder("tiny")
    images = torch.cat([batch["winner"], batch["loser"]])
    before = L.combine_features(*M.clip_features(clip, tok, [""] * 4, images), "mean", rows=8).chunk(2)
    assert not torch.allclose(L.rpo_weights(*before, 0.5), w0, atol=1e-4)


def xl_manifest(folder, n=4):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(n):
            for side in ("w", "l"):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}{side}.png")
            f.write(json.dumps({"prompt": PROMPTS[i], "winner": f"{i}w.png", "loser": f"{i}l.png"}) + "\n")
    return folder / "pairs.jsonl"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-xl"])
def test_dropped_captions_get_sampling_unconditional_input_raw_and_cached(tmp_path, name):
    pairs = xl_manifest(tmp_path / "raw")
    build_cache.build_cache(name, str(pairs), str(tmp_path / "cache"), dtype="fp32", progress=False)
    m = M.load_models(name, reference=False)
    cached_ds = cache.CachedPairs(str(tmp_path / "cache"), name)
    m.empty = cached_ds.empty
    raw = data.collate_pairs([data.ManifestPairs(pairs, 32)[i] for i in range(4)])
    cached = data.collate_pairs([cached_ds[i] for i in range(4)])
    args = train.parse_args(["--model", name, "--loss", "rpo", "--caption_dropout", "1.0"])
    share, g = D.Share(4), lambda: torch.Generator().manual_seed(0)
    _, c_raw, f_raw = train.model_inputs(m, raw, g(), args, share, M.load_embedder("tiny"))
    _, c_cached, f_cached = train.model_inputs(m, cached, g(), args, share)
    uncond = M.encode_prompts(m, [""], drop=torch.tensor([True]))  # sample.py's rule
    for c in (c_raw, c_cached):
        hidden = c["encoder_hidden_states"]
        if m.xl:  # SDXL: zeros, hidden states and pooled embedding
            assert torch.count_nonzero(hidden) == 0
            assert torch.count_nonzero(c["added_cond_kwargs"]["text_embeds"]) == 0
        else:  # SD1.5: the encoding of ""
            assert torch.allclose(hidden, uncond["encoder_hidden_states"].expand_as(hidden), atol=1e-6)
    # E5 embeds the prompts themselves in both paths
    clip, tok = M.load_embedder("tiny")
    own_text, _ = M.clip_features(clip, tok, PROMPTS, None)
    assert torch.allclose(f_raw[0], own_text, atol=1e-6) and torch.allclose(f_cached[0].float(), own_text, atol=1e-6)


def stock_pipeline(m):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                 scheduler=m.scheduler)
    if m.xl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=m.text_encoders[1], tokenizer_2=m.tokenizers[1],
                                         add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-xl"])
def test_training_conditioning_equals_the_stock_pipeline(name):
    """Prompt encoding, the unconditional input (a dropped caption, sample.py's guidance) and
    SDXL's time ids, next to diffusers' own encode_prompt / _get_add_time_ids on the same
    components."""
    m = M.load_models(name, reference=False)
    pipe = stock_pipeline(m)
    # (one prompt a call: batched kernels round differently, so batch 1 against the pipeline's 1)
    ours, dropped = M.encode_prompts(m, PROMPTS[:1]), M.encode_prompts(m, PROMPTS[:1], drop=torch.tensor([True]))
    with torch.no_grad():
        if m.xl:
            pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=True)
        else:
            pe, npe = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    assert torch.equal(ours["encoder_hidden_states"][0], pe[0])
    assert torch.equal(dropped["encoder_hidden_states"][0], npe[0])
    sample_uncond = M.encode_prompts(m, [""], drop=torch.tensor([True]))  # what sample.py guides against
    assert torch.equal(sample_uncond["encoder_hidden_states"][0], npe[0])
    if m.xl:
        assert torch.equal(ours["added_cond_kwargs"]["text_embeds"][0], pooled[0])
        assert torch.equal(dropped["added_cond_kwargs"]["text_embeds"][0], npooled[0])
        assert torch.equal(sample_uncond["added_cond_kwargs"]["text_embeds"][0], npooled[0])
        R = m.resolution
        want = pipe._get_add_time_ids((R, R), (0, 0), (R, R), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(ours["added_cond_kwargs"]["time_ids"][0], want[0])


def test_sdxl_time_ids_stay_exact_under_bf16():
    m = M.load_models("tiny-xl", reference=False, mixed_precision="bf16")
    sizes = torch.tensor([[1366, 2049], [513, 1024]])
    cond = M.text_conditioning(m, torch.zeros(2, 3, 64), torch.zeros(2, 32), sizes, torch.tensor([[7, 1023], [0, 0]]))
    ids = cond["added_cond_kwargs"]["time_ids"]
    assert ids.dtype == torch.float32
    assert ids[:, :4].tolist() == [[1366, 2049, 7, 1023], [513, 1024, 0, 0]]
    assert torch.tensor(1366.0).to(torch.bfloat16).item() != 1366  # (what a bf16 cast would have made of it)
