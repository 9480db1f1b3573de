"""python -m tools.build_cache + train.py --data cache:DIR: the cached batch trains exactly as the raw one."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
from tools import build_cache
import loss as L
import model as M
from plumbing import distributed as D
import train
from plumbing import cache


def manifest(folder, n=8):
    """n pairs of random images in non-square sizes: resize, centre crop and SDXL's size/crop
    conditioning all matter."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(n):
            size = (48, 40) if i % 2 else (40, 52)
            for side in ("w", "l"):
                Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}{side}.png")
            f.write(json.dumps({"prompt": f"a red circle {i}", "winner": f"{i}w.png", "loser": f"{i}l.png"}) + "\n")
    return folder / "pairs.jsonl"


def run(tmp_path, name, data_arg, *extra):
    out = tmp_path / name
    train.main(["--model", "tiny-xl", "--data", data_arg, "--batch_size", "4", "--max_steps", "3", "--seed", "1",
                "--caption_dropout", "0.5", "--lr", "1e-3", "--out_dir", str(out), "--no_progress", *extra])
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_cached_batch_gives_the_raw_batch_loss(tmp_path):
    """One fixed batch, same seed, same crops, caption dropout at p = 0.5: the cache's
    latents (VAE posterior re-sampled from the cached μ, σ with the same draw), conditioning
    (SDXL: both encoders' states, pooled embedding, time ids) and E5 embeddings equal the raw
    ones, and so does the RPO loss."""
    pairs = manifest(tmp_path / "raw")
    index = build_cache.build_cache("tiny-xl", str(pairs), str(tmp_path / "cache"), dtype="fp32", batch_size=3,
                             shard_size=5, progress=False)  # 2 shards, batches straddling them
    assert index["num_pairs"] == 8 and [s["num_pairs"] for s in index["shards"]] == [6, 2]
    m = M.load_models("tiny-xl")
    raw_ds, cached_ds = data.ManifestPairs(pairs, 32), cache.CachedPairs(str(tmp_path / "cache"), "tiny-xl")
    idx = [3, 0, 5, 6]
    raw, cached = data.collate_pairs([raw_ds[i] for i in idx]), data.collate_pairs([cached_ds[i] for i in idx])
    m.empty = cached_ds.empty  # (train.py sets this for --data cache:DIR)
    args = train.parse_args(["--loss", "rpo", "--caption_dropout", "0.5"])
    # Caption dropout draws from the generator like everything else: the same draw (seed 5)
    # drops the same prompts in both batches.
    g = lambda: torch.Generator().manual_seed(5)
    z_raw, c_raw, f_raw = train.model_inputs(m, raw, g(), args, D.Share(4), M.load_embedder("tiny"))
    z, c, features = train.model_inputs(m, cached, g(), args, D.Share(4))
    dropped = torch.rand(4, generator=g()) < 0.5
    assert 0 < dropped.sum() < 4  # some prompts dropped, some kept
    e_raw, e = L.combine_features(*f_raw), L.combine_features(*features)
    assert torch.equal(z, z_raw) and torch.equal(c["encoder_hidden_states"], c_raw["encoder_hidden_states"])
    assert torch.equal(c["added_cond_kwargs"]["time_ids"], c_raw["added_cond_kwargs"]["time_ids"])
    # (the empty prompt's pooled embedding was computed in a batch of one: float rounding only)
    assert torch.allclose(c["added_cond_kwargs"]["text_embeds"], c_raw["added_cond_kwargs"]["text_embeds"], atol=1e-6)
    assert torch.allclose(e, e_raw, atol=1e-6)
    with torch.no_grad():  # a policy one AdamW-sized step away from the reference: the loss is not ln 2
        for p in m.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss_raw, _ = train.micro_batch_loss(m, raw, g(), args, embedder=M.load_embedder("tiny"))
    loss, _ = train.micro_batch_loss(m, cached, g(), args)
    assert abs(loss_raw.item() - math.log(2)) > 1e-2
    # β = 5000 multiplies the error differences: 1e-7 of float rounding in ε_θ is 2.5e-4 in a logit
    assert abs(loss.item() - loss_raw.item()) < 1e-3, (loss.item(), loss_raw.item())


@pytest.mark.parametrize("loss", ["rpo", "sft"])
def test_cached_training_follows_the_raw_run(tmp_path, loss):
    """train.py end to end: the same pairs in the same order, the same dropout, t and ε. The
    reference's denoising errors (data-dependent; the reference never changes) agree to float
    rounding at every step; the policy's to 1e-3 (AdamW's first steps are sign-like, so β's
    amplification of rounding moves a few near-zero-gradient weights differently)."""
    pairs = manifest(tmp_path / "raw")
    build_cache.build_cache("tiny-xl", str(pairs), str(tmp_path / "cache"), dtype="fp32", progress=False)
    raw = run(tmp_path, "raw-run", str(pairs), "--loss", loss)
    cached = run(tmp_path, "cached-run", f"cache:{tmp_path / 'cache'}", "--loss", loss)
    exact, close = (["ref_mse_w", "ref_mse_l"], ["mse_w", "mse_l"]) if loss == "rpo" else (["loss"], [])
    assert all(abs(raw[0][k] - cached[0][k]) <= 1e-6 for k in exact + close)  # step 1: the same model
    for a, b in zip(raw, cached):
        assert all(abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) for k in exact[:2 if loss == "rpo" else 0]), (a, b)
        assert all(abs(a[k] - b[k]) <= 1e-3 * abs(a[k]) for k in exact + close), (a, b)
    assert len({round(r[exact[0]], 3) for r in raw}) == 3  # the steps saw different data


def test_cache_holds_encoder_outputs_and_flips(tmp_path):
    pairs = manifest(tmp_path / "raw", n=3)
    build_cache.build_cache("tiny-xl", str(pairs), str(tmp_path / "cache"), dtype="fp32", flip=True, progress=False)
    m = M.load_models("tiny-xl", reference=False)
    raw = data.ManifestPairs(pairs, 32)[2]
    post = m.vae.encode(torch.stack([raw["winner"], raw["winner"].flip(-1)])).latent_dist
    ds = cache.CachedPairs(str(tmp_path / "cache"), "tiny-xl", random_flip=True)
    flips = []
    for epoch in range(8):
        ds.epoch = epoch
        it = ds[2]
        flipped = torch.allclose(it["cache_latent_w"], post.mean[1], atol=1e-6)
        assert flipped or torch.allclose(it["cache_latent_w"], post.mean[0], atol=1e-6)
        flips.append(flipped)
    assert any(flips) and not all(flips)  # both views are used over epochs
    hidden, pooled = M.encode_text(m, [raw["prompt"]])
    assert torch.allclose(it["cache_text_hidden"], hidden[0]) and torch.allclose(it["cache_text_pooled"], pooled[0])
    assert it["original_size_w"] == raw["original_size_w"] and it["crop_top_left"] == raw["crop_top_left"]


def test_cache_refuses_another_model_or_setting(tmp_path):
    build_cache.build_cache("tiny", "toy", str(tmp_path / "cache"), num_items=8, dtype="fp32", progress=False)
    spec = f"cache:{tmp_path / 'cache'}"
    for args, words in ((["--model", "tiny-sd"], "built for --model tiny, not --model tiny-sd"),
                        (["--random_flip"], "rebuild it with --flip"),
                        (["--resolution", "32"], "holds 16px crops"),
                        (["--embed_model", str(tmp_path)], "E5 features of --embed_model tiny"),
                        (["--random_crop"], "centre crops only")):
        with pytest.raises(SystemExit) as e:
            train.main(["--data", spec, "--out_dir", str(tmp_path / "o"), *args])
        assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", f"cache:{tmp_path / 'nothing'}", "--out_dir", str(tmp_path / "o")])
    assert "index.json missing" in str(e.value)


def test_cached_training_loads_no_encoders(tmp_path, monkeypatch):
    build_cache.build_cache("tiny-sd", "toy", str(tmp_path / "cache"), num_items=8, dtype="fp32", progress=False)
    seen = {}
    real = M.load_models
    monkeypatch.setattr(M, "load_models", lambda *a, **k: seen.setdefault("m", real(*a, **k)))
    monkeypatch.setattr(M, "load_embedder", lambda *a, **k: pytest.fail("CLIP loaded for a cached run"))
    train.main(["--model", "tiny-sd", "--data", f"cache:{tmp_path / 'cache'}", "--max_steps", "1",
                "--out_dir", str(tmp_path / "o"), "--no_progress"])
    assert seen["m"].vae is None and seen["m"].text_encoders == [] and seen["m"].vae_scale == 0.18215


def test_text_states_are_stored_once_per_distinct_prompt(tmp_path):
    build_cache.build_cache("tiny-sd", "toy", str(tmp_path / "cache"), num_items=40, dtype="fp32", shard_size=100,
                     progress=False)
    shard = load_file(tmp_path / "cache" / "shard-00000.safetensors")
    ds = cache.CachedPairs(str(tmp_path / "cache"), "tiny-sd")
    prompts = [ds[i]["prompt"] for i in range(len(ds))]
    assert prompts == [data.ToyPairs(40, 32)[i]["prompt"] for i in range(40)]  # order and prompts kept
    assert len(set(prompts)) < 40 and shard["text_hidden"].shape[0] == len(set(prompts))
    assert shard["latent_w"].shape[0] == 40
    m = M.load_models("tiny-sd", reference=False)
    for i in (0, 17, 39):
        hidden, _ = M.encode_text(m, [prompts[i]])
        assert torch.allclose(ds[i]["cache_text_hidden"], hidden[0], atol=1e-6)


def test_cache_built_in_parts_reads_as_one(tmp_path):
    """torchrun -m tools.build_cache: each process caches a contiguous part; the parts read as the
    one-process cache (same items, same order, index-level skips counted once)."""
    pairs = manifest(tmp_path / "raw", n=7)
    with open(pairs, "a") as f:
        f.write(json.dumps({"caption": "tie", "image_0": "0w.png", "image_1": "0l.png", "label_0": 0.5}) + "\n")
    build_cache.build_cache("tiny-xl", str(pairs), str(tmp_path / "one"), dtype="fp32", progress=False)
    for part in (1, 0, 2):  # any order, as processes finish
        if part == 2:
            with pytest.raises(FileNotFoundError, match="2 of its 3 part indexes"):
                cache.CachedPairs(str(tmp_path / "parts"), "tiny-xl")
        build_cache.build_cache("tiny-xl", str(pairs), str(tmp_path / "parts"), dtype="fp32", progress=False,
                         shard_size=2, part=part, parts=3)
    one, parts = cache.CachedPairs(str(tmp_path / "one"), "tiny-xl"), cache.CachedPairs(str(tmp_path / "parts"), "tiny-xl")
    assert len(one) == len(parts) == 7 and parts.index["skip_counts"] == one.index["skip_counts"] == {"tie": 1}
    for i in range(7):
        a, b = one[i], parts[i]
        assert a.keys() == b.keys() and a["prompt"] == b["prompt"]
        # (equal up to float rounding: the encoders ran on batches of other sizes)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a if k.startswith("cache_")), i
