import torch

import model as M
from plumbing import toy_clip
from toy import clip as T
from plumbing.images import toy_prompts

SHORT = dict(T.RECIPE, steps=40, warmup=5)  # ~4 s on one CPU thread


def test_toy_clip_caches_by_recipe_and_learns(tmp_path, monkeypatch):
    monkeypatch.setenv("RPO_DIFFUSION_CACHE", str(tmp_path))
    clip, tok = T.load(SHORT, verbose=False)
    folder = toy_clip.cache_dir(SHORT)
    assert folder.startswith(str(tmp_path)) and folder.endswith(toy_clip.recipe_key(SHORT))
    assert toy_clip.cache_dir(dict(SHORT, steps=41)) != folder  # another recipe, another folder

    # Training is deterministic: a second run from scratch gives the cached weights bit for bit
    fresh = T.train(SHORT, log_every=0)[0].state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in clip.state_dict().items())

    # The cache round-trip gives the same weights, without training (train would fail here)
    monkeypatch.setattr(T, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again, _ = T.load(SHORT, verbose=False)
    a, b = clip.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # M.load_embedder("toy-clip"), what train.py and the cache ask for, is that model (RECIPE patched)
    monkeypatch.setattr(toy_clip, "RECIPE", SHORT)
    emb, _ = M.load_embedder("toy-clip")
    assert torch.equal(emb.visual_projection.weight, clip.visual_projection.weight)
    assert not torch.equal(emb.visual_projection.weight, M.load_embedder("tiny")[0].visual_projection.weight)

    # A short training already retrieves far above chance on the training prompts (60-way)
    prompts = toy_prompts("train")
    acc = T.retrieval_accuracy(clip, tok, prompts, rounds=1)
    assert acc > 5 / len(prompts), acc


def test_tiny_presets_default_to_toy_clip_and_tau_moves_the_logged_entropy(tmp_path, monkeypatch):
    import json
    import train
    monkeypatch.delenv("RPO_DIFFUSION_TOY_E5", raising=False)  # (conftest's test default: the random CLIP)
    assert train.parse_args(["--model", "tiny"]).embed_model == "toy-clip"
    assert train.parse_args(["--model", "tiny-xl"]).embed_model == "toy-clip"
    assert train.parse_args(["--model", "sdxl"]).embed_model == "openai/clip-vit-large-patch14"
    monkeypatch.setenv("RPO_DIFFUSION_TOY_E5", "tiny")
    assert train.parse_args(["--model", "tiny"]).embed_model == "tiny"

    # With the trained CLIP, τ changes E6's weights on toy batches: the logged entropy follows τ
    # and at a low τ the weights concentrate far more than the random CLIP's, whose features of
    # toy samples lie close together.
    monkeypatch.setenv("RPO_DIFFUSION_CACHE", str(tmp_path))
    monkeypatch.setattr(toy_clip, "RECIPE", SHORT)
    T.load(SHORT, verbose=False)  # (trained into the cache, where load_embedder("toy-clip") reads it)
    entropy = {}
    for embed_model in ("toy-clip", "tiny"):
        for tau in (0.05, 1.0):
            out = tmp_path / f"{embed_model}-{tau}"
            train.main(["--model", "tiny", "--loss", "rpo", "--tau", str(tau), "--embed_model", embed_model,
                        "--max_steps", "3", "--batch_size", "8", "--out_dir", str(out), "--no_progress", "--seed", "1"])
            rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
            entropy[embed_model, tau] = sum(r["weight_entropy"] for r in rows) / len(rows)
    assert entropy["toy-clip", 0.05] < entropy["toy-clip", 1.0] - 0.3, entropy
    assert entropy["toy-clip", 0.05] < entropy["tiny", 0.05] - 0.5, entropy
