"""evaluate.py's reward models for real images, and sample.py's prompt sets.

Tiny random CLIPs are saved to disk the way the hub repos are laid out and loaded through the same
code paths as the real ids (CLIPModel / AutoProcessor .from_pretrained). Every score is checked
against an independent computation with the same weights: the image processor's steps done by
hand with PIL and numpy, the CLIP towers called module by module (or through CLIPModel.forward),
the aesthetic MLP as plain matrix products. Win rates and bootstrap intervals are checked on
hand-made score lists with hand-derived answers."""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import evaluate as E
from plumbing import images, rewards
from plumbing import hub
from plumbing import tiny as tiny_parts
import sample as S

PROMPTS = ["a red circle on a gray background", "a cat", "a blue square on a white background"]
SIZE = 16  # the tiny CLIPs' input resolution
# Without torchvision (CI), transformers' CLIP image processor is the PIL one, which the manual
# preprocessing below reproduces exactly; with torchvision its resize differs by a grey level or so.
PIL_BACKEND = importlib.util.find_spec("torchvision") is None
TOL = 1e-4 if PIL_BACKEND else 5e-2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_clip(seed):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig
    tok = tiny_parts.tiny_tokenizer(max_length=SIZE)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=SIZE, projection_dim=32,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=4, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=32))
    return clip.eval(), tok


def tiny_processor(tok):
    import transformers
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    images = cls(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return transformers.CLIPProcessor(image_processor=images, tokenizer=tok)


def save_tiny_reward_models(folder):
    """Tiny random stand-ins for the real models, laid out as their hub repos are:
      FOLDER/clip                 CLIPModel + its processor       (--clip_model)
      FOLDER/pickscore            CLIPModel only, another seed    (--pickscore_model)
      FOLDER/pickscore_processor  a processor only                (--pickscore_processor)
      FOLDER/aesthetic.safetensors, FOLDER/aesthetic.pth   a 32-d LAION-shaped head (--aesthetic_head)
    Also used for the README's example table (numbers meaningless)."""
    os.makedirs(folder, exist_ok=True)
    clip, tok = tiny_clip(8)  # a seed whose cosines have both signs: clip scores both clipped and not
    clip.save_pretrained(os.path.join(folder, "clip"))
    tiny_processor(tok).save_pretrained(os.path.join(folder, "clip"))
    tiny_clip(2)[0].save_pretrained(os.path.join(folder, "pickscore"))
    tiny_processor(tok).save_pretrained(os.path.join(folder, "pickscore_processor"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        head = rewards.AestheticHead(32)
        torch.nn.init.constant_(head.layers[7].bias, 5.0)  # centred like the real 1-10 ratings
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    save_file(state, os.path.join(folder, "aesthetic.safetensors"))
    torch.save(state, os.path.join(folder, "aesthetic.pth"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_reward_models(str(tmp_path_factory.mktemp("tiny_rewards")))


def write_folder(folder, keys, images):
    """A sample.py-like folder: PNGs + samples.jsonl with prompt, seed, file."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        for i, ((prompt, seed), img) in enumerate(zip(keys, images)):
            Image.fromarray(img).save(os.path.join(folder, f"{i:04d}_seed{seed}.png"))
            f.write(json.dumps({"prompt": prompt, "seed": seed, "file": f"{i:04d}_seed{seed}.png"}) + "\n")
    return str(folder)


def random_images(n, seed, size=(28, 20)):  # (H, W): not square and not 16, so resize and crop both act
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))  # a colour per image plus noise: images differ in more than noise
    return np.clip(base + rng.normal(0, 40, (n, *size, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The independent computation


def manual_pixels(path):
    """CLIPImageProcessor's steps by hand: shortest side to SIZE with PIL bicubic (the longer side
    int(SIZE·long/short)), centre crop SIZE×SIZE, /255, then (x - mean)/std with OpenAI CLIP's
    constants."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    nw, nh = (SIZE, int(SIZE * h / w)) if w <= h else (int(SIZE * w / h), SIZE)
    x = np.asarray(im.resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255
    top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
    x = (x[top:top + SIZE, left:left + SIZE] - np.float32(images.CLIP_MEAN)) / np.float32(images.CLIP_STD)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)


@torch.no_grad()
def manual_features(clip, tok, texts, pixels):
    """Unit-length text and image embeddings through the towers' own modules."""
    ids = tok(texts, padding=True, return_tensors="pt")
    t = clip.text_projection(clip.text_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output)
    i = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    return t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)


@torch.no_grad()
def expected_scores(tiny, paths, prompts, style_text, neutral_text):
    from safetensors.torch import load_file
    from transformers import CLIPModel
    pixels = torch.stack([manual_pixels(p) for p in paths])
    clip, tok = CLIPModel.from_pretrained(os.path.join(tiny, "clip")).eval(), tiny_parts.tiny_tokenizer(max_length=SIZE)
    text, image = manual_features(clip, tok, prompts, pixels)
    out = {"clip": np.maximum(100 * (text * image).sum(-1).numpy(), 0)}
    # style: CLIPModel.forward's logits_per_image = logit_scale.exp() · cos, over [style, neutral]
    ids = tok([style_text, neutral_text], padding=True, return_tensors="pt")
    logits = clip(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels).logits_per_image
    out["style"] = logits.softmax(-1)[:, 0].numpy()
    # aesthetic: the five Linear layers as matrix products on the normalised image embedding
    w, h = load_file(os.path.join(tiny, "aesthetic.safetensors")), image.double()
    for k in (0, 2, 4, 6, 7):
        h = h @ w[f"layers.{k}.weight"].double().T + w[f"layers.{k}.bias"].double()
    out["aesthetic"] = h[:, 0].numpy()
    # pickscore: the other CLIP's forward, logits_per_image[i, j] = logit_scale.exp() · cos(image i, text j)
    pick = CLIPModel.from_pretrained(os.path.join(tiny, "pickscore")).eval()
    unique = list(dict.fromkeys(prompts))
    ids = tok(unique, padding=True, return_tensors="pt")
    logits = pick(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels).logits_per_image
    out["pickscore"] = logits[torch.arange(len(prompts)), [unique.index(p) for p in prompts]].numpy()
    return out


# ----------------------------------------------------------------------------------------------
# Score formulas, win rates, bootstrap: hand-made inputs, hand-derived answers


def test_score_formulas_on_hand_made_embeddings():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    image = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    assert E.clip_score(text, image).tolist() == pytest.approx([60.0, 0.0])  # cos 0.6 -> 60; cos -1 clipped to 0
    assert E.pickscore(text, image, torch.tensor(np.log(100.0))).tolist() == pytest.approx([60.0, -100.0])
    # logits log(2).exp() · [cos to style, cos to neutral] = [2, 0] -> e²/(e²+1); and the reverse
    p = E.style_probability(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
                            torch.tensor(np.log(2.0)))
    assert p.tolist() == pytest.approx([np.e ** 2 / (np.e ** 2 + 1), 1 / (np.e ** 2 + 1)])


def test_win_rate_ties_count_half():
    assert E.win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == 0.625  # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
    assert E.win_rate([3, 3], [3, 3]) == 0.5
    assert E.win_rate([0.1], [0.2]) == 0.0


def test_bootstrap_interval_on_hand_made_scores():
    # 9 wins and 1 loss: a resample's win rate is Binomial(10, 0.9)/10. P(X <= 6) = 0.013 and
    # P(X <= 7) = 0.070 put the 2.5% quantile at 0.7; P(X <= 9) = 0.65 puts the 97.5% one at 1.0.
    a, b = [1] * 9 + [0], [0] * 9 + [1]
    assert E.bootstrap_interval(a, b, n=20000, seed=0) == (0.7, 1.0)
    assert E.bootstrap_interval(a, b, n=20000, seed=1) == (0.7, 1.0)
    # 8 wins and 2 losses: P(X <= 4) = 0.006 and P(X <= 5) = 0.033 -> 0.5; a 90% level gives 0.6
    a, b = [1] * 8 + [0] * 2, [0] * 8 + [1] * 2
    assert E.bootstrap_interval(a, b, n=20000, seed=0) == (0.5, 1.0)
    assert E.bootstrap_interval(a, b, n=20000, seed=0, level=0.9) == (0.6, 1.0)
    # all ties: every resample is 0.5; all wins: every resample is 1
    assert E.bootstrap_interval([2, 2, 2], [2, 2, 2]) == (0.5, 0.5)
    assert E.bootstrap_interval([2, 3], [1, 1]) == (1.0, 1.0)
    # a fixed seed: the same lists give the same interval; the interval holds the win rate
    a, b = np.random.default_rng(0).normal(size=(2, 50))
    lo, hi = E.bootstrap_interval(a, b, n=500, seed=0)
    assert (lo, hi) == E.bootstrap_interval(a, b, n=500, seed=0) and lo < E.win_rate(a, b) < hi
    # ... and its width is about what the binomial standard error says: 2·1.96·sqrt(p(1-p)/n)
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.5 * 0.5 / 50), abs=0.06)


def test_pairs_by_prompt_and_seed():
    a = [("x", 0), ("x", 1), ("y", 0), ("z", 3)]
    b = [("y", 0), ("x", 1), ("w", 0), ("x", 0)]
    assert E.pair_indices(a, b) == ([0, 1, 2], [3, 1, 0])
    run = {"label": "tuned", "dir": "A", "n_images": 4, "keys": [list(k) for k in a],
           "scores": {"m": [1.0, 2.0, 3.0, 9.0]}}
    base = {"label": "base", "dir": "B", "n_images": 4, "keys": [list(k) for k in b],
            "scores": {"m": [3.0, 1.0, 7.0, 0.5]}}
    wins, unmatched = E.compare_runs(run, base, ["m"], n_bootstrap=100)
    # pairs: (1 vs 0.5) win, (2 vs 1) win, (3 vs 3) tie; ("z", 3) and ("w", 0) unmatched
    assert wins["m"]["win_rate"] == pytest.approx(2.5 / 3) and wins["m"]["pairs"] == 3
    assert unmatched == {"tuned": 1, "base": 1}
    with pytest.raises(SystemExit, match="nothing to compare"):
        E.compare_runs(run, {**base, "keys": [["q", 0]] * 4}, ["m"])


def test_reward_table_layout():
    runs = [{"label": "rpo", "metrics": {"clip": {"mean": 30.1234, "std": 2.5}}},
            {"label": "base", "metrics": {"clip": {"mean": 29.0, "std": 3.0}}}]
    wins = {"rpo": {"clip": {"win_rate": 0.625, "ci95": [0.5, 0.75], "pairs": 8}}}
    assert E.reward_table(runs, ["clip"], wins, "base") == (
        "| metric | rpo (mean ± std) | base (mean ± std) | win rate rpo > base [95% CI] |\n"
        "|---|---|---|---|\n"
        "| clip | 30.123 ± 2.500 | 29.000 ± 3.000 | 0.625 [0.500, 0.750] |\n")


# ----------------------------------------------------------------------------------------------
# Tiny models through the real loading paths, checked against the independent computation


def test_aesthetic_head_loads_safetensors_and_pth_only_as_weights(tiny, tmp_path):
    st = rewards.load_aesthetic_head(os.path.join(tiny, "aesthetic.safetensors"), 32)
    pth = rewards.load_aesthetic_head(os.path.join(tiny, "aesthetic.pth"), 32)
    assert list(st.state_dict()) == [f"layers.{k}.{p}" for k in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    for k, v in st.state_dict().items():
        assert torch.equal(v, pth.state_dict()[k])
    x = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    manual = x
    for k in (0, 2, 4, 6, 7):
        manual = manual @ st.state_dict()[f"layers.{k}.weight"].T + st.state_dict()[f"layers.{k}.bias"]
    assert E.aesthetic_score(pth, x) == pytest.approx(manual[:, 0], abs=1e-5)
    assert st.layers[0].in_features == 32 and rewards.AestheticHead().layers[0].in_features == 768  # published: ViT-L/14

    # A pickle that would run code is refused (weights_only=True), in one line naming the flag.
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 32), "payload": types.SimpleNamespace(x=1)}, evil)
    for path, needle in ((evil, "Unpickl"), (tmp_path / "missing.pth", "no such file")):
        with pytest.raises(SystemExit) as err:
            rewards.load_aesthetic_head(str(path), 32)
        msg = str(err.value)
        assert msg.startswith("error: cannot load the aesthetic head") and needle in msg
        assert "--aesthetic_head" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="takes 32-d embeddings but --aesthetic_clip gives 768-d"):
        rewards.load_aesthetic_head(os.path.join(tiny, "aesthetic.pth"), 768)


def test_cli_scores_pairs_and_writes_table_json_and_chart(tiny, tmp_path, capsys, monkeypatch):
    keys_a = [(p, s) for p in PROMPTS for s in (0, 1)]
    keys_b = [k for k in keys_a if k != (PROMPTS[2], 1)] + [(PROMPTS[2], 7)]  # one unmatched on each side
    imgs_a, imgs_b = random_images(6, 0), random_images(6, 1)
    imgs_b[:2] = imgs_a[:2]  # (PROMPTS[0], 0) and (PROMPTS[0], 1): the same image in both -> ties
    a = write_folder(tmp_path / "tuned", keys_a, imgs_a)
    b = write_folder(tmp_path / "base", keys_b, imgs_b)
    loads, real_load_clip = [], hub.load_clip

    def counting_load_clip(name, *args, **kw):
        loads.append(name)
        return real_load_clip(name, *args, **kw)
    monkeypatch.setattr(hub, "load_clip", counting_load_clip)
    out = tmp_path / "res" / "results.json"
    out.parent.mkdir()
    E.main(["--images", a, "--baseline", b, "--metrics", "pickscore,aesthetic,style",
            "--pickscore_model", f"{tiny}/pickscore", "--pickscore_processor", f"{tiny}/pickscore_processor",
            "--clip_model", f"{tiny}/clip", "--aesthetic_head", f"{tiny}/aesthetic.pth", "--style_name", "sketch",
            "--bootstrap", "200", "--out", str(out)])
    # CLIP loaded once for style, clip (added by style: content kept) and aesthetic; PickScore once
    assert sorted(loads) == sorted([f"{tiny}/pickscore", f"{tiny}/clip"])
    res = json.load(open(out))
    assert res["metrics"] == ["pickscore", "aesthetic", "style", "clip"] and res["baseline"] == "base"
    assert res["style_text"] == "a pencil sketch" and res["neutral_text"] == "a photo"
    run_a, run_b = res["runs"]
    for run, keys, folder in ((run_a, keys_a, a), (run_b, keys_b, b)):
        assert [tuple(k) for k in run["keys"]] == keys and run["n_images"] == 6
        paths = [os.path.join(folder, f"{i:04d}_seed{s}.png") for i, (_, s) in enumerate(keys)]
        expected = expected_scores(tiny, paths, [p for p, _ in keys], "a pencil sketch", "a photo")
        for m, want in expected.items():
            # clip/pickscore are in units of 100·cos; float(): pytest 9 rejects a numpy scalar as abs=
            scale = float(max(1.0, np.abs(want).max()))
            assert np.asarray(run["scores"][m]) == pytest.approx(want, abs=TOL * scale), m
            assert run["metrics"][m]["mean"] == pytest.approx(np.mean(run["scores"][m]), abs=1e-9)
            assert run["metrics"][m]["std"] == pytest.approx(np.std(run["scores"][m], ddof=1), abs=1e-9)
        assert min(np.ptp(want) for want in expected.values()) > 1e-4  # no score is constant...
        # ...and some CLIP scores are well above the clip at 0 (whether one also clips to 0 depends on
        # the random tiny CLIP's initialisation, which differs between transformers versions)
        assert (expected["clip"] > 1).any() and (expected["clip"] >= 0).all()

    # win rates over the 5 shared (prompt, seed) pairs, recomputed here from the per-image scores
    where_b = {tuple(k): i for i, k in enumerate(run_b["keys"])}
    for m in res["metrics"]:
        pairs = [(run_a["scores"][m][i], run_b["scores"][m][where_b[tuple(k)]])
                 for i, k in enumerate(run_a["keys"]) if tuple(k) in where_b]
        assert len(pairs) == 5 and pairs[0][0] == pairs[0][1] and pairs[1][0] == pairs[1][1]  # identical images tie
        want = np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs])
        w = res["win_rates"]["tuned"][m]
        assert w["win_rate"] == pytest.approx(want) and w["pairs"] == 5
        assert w["ci95"][0] <= w["win_rate"] <= w["ci95"][1]
    assert res["unmatched"] == {"tuned": {"tuned": 1, "base": 1}}

    printed = capsys.readouterr()
    assert "warning: 1 images of tuned and 1 of base have no (prompt, seed) match" in printed.err
    table = printed.out.splitlines()
    assert "| metric | tuned (mean ± std) | base (mean ± std) | win rate tuned > base [95% CI] |" in table
    w = res["win_rates"]["tuned"]["clip"]
    row = (f"| clip | {run_a['metrics']['clip']['mean']:.3f} ± {run_a['metrics']['clip']['std']:.3f} | "
           f"{run_b['metrics']['clip']['mean']:.3f} ± {run_b['metrics']['clip']['std']:.3f} | "
           f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] |")
    assert row in table
    assert Image.open(tmp_path / "res" / "results.png").size == (4 * 300, 350)  # one panel per metric


def test_several_folders_against_one_baseline_and_no_matplotlib(tiny, tmp_path, capsys, monkeypatch):
    keys = [(p, 0) for p in PROMPTS]
    a = write_folder(tmp_path / "a", keys, random_images(3, 0))
    a2 = write_folder(tmp_path / "a2", keys, random_images(3, 0))  # the same images as a
    b = write_folder(tmp_path / "b", keys, random_images(3, 1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the chart is optional: table and JSON still come
    out = tmp_path / "r.json"
    E.main(["--images", a, a2, "--baseline", b, "--metrics", "clip", "--clip_model", f"{tiny}/clip", "--out", str(out)])
    res = json.load(open(out))
    assert list(res["win_rates"]) == ["a", "a2"] and res["win_rates"]["a"] == res["win_rates"]["a2"]
    printed = capsys.readouterr()
    assert "| metric | a (mean ± std) | a2 (mean ± std) | b (mean ± std) | win rate a > b [95% CI] | " \
           "win rate a2 > b [95% CI] |" in printed.out
    assert "no bar chart (plotting needs matplotlib" in printed.err and not os.path.exists(tmp_path / "r.png")


# ----------------------------------------------------------------------------------------------
# One-line errors: missing models and files; toy names (optional packages: tests/test_reward_packages.py)


def cli(tmp_path, *argv):
    folder = write_folder(tmp_path / "imgs", [(PROMPTS[0], 0)], random_images(1, 0))
    with pytest.raises(SystemExit) as err:
        E.main(["--images", folder, "--out", str(tmp_path / "r.json"), *argv])
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_models_and_files_are_one_line_naming_the_flag(tiny, tmp_path):
    msg = cli(tmp_path, "--metrics", "clip", "--clip_model", str(tmp_path / "no_clip"))
    assert msg.startswith(f"error: cannot load CLIP '{tmp_path / 'no_clip'}'") and msg.endswith(
        "pass --clip_model /path/to/a/local/copy")
    msg = cli(tmp_path, "--metrics", "pickscore", "--pickscore_model", f"{tiny}/pickscore",
              "--pickscore_processor", str(tmp_path / "no_proc"))
    assert "cannot load the processor of PickScore" in msg and "pass --pickscore_processor" in msg
    msg = cli(tmp_path, "--metrics", "aesthetic", "--clip_model", f"{tiny}/clip",
              "--aesthetic_head", str(tmp_path / "head.pth"))
    assert "no such file" in msg and "pass --aesthetic_head" in msg


def test_metric_names_toy_and_real_do_not_mix(tmp_path):
    assert "the toy scorer's are now toy_style, toy_content" in cli(tmp_path, "--metrics", "style,content")
    assert "separate runs" in cli(tmp_path, "--metrics", "toy_style,clip")
    assert "--baseline (win rates) is for reward-model metrics" in cli(
        tmp_path, "--metrics", "toy_style", "--baseline", str(tmp_path / "imgs"))


# ----------------------------------------------------------------------------------------------
# Prompt sets for sample.py


def test_prompt_sets_builtin_parti_tsv_and_hpsv2_json(tmp_path):
    builtin = S.read_prompts("builtin")
    assert builtin == S.BUILTIN_PROMPTS and len(builtin) == 12 and len(set(builtin)) == 12
    # PartiPrompts: tab-separated, header with a Prompt column (not necessarily the first), no quoting
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Category\tPrompt\tChallenge\tNote\n"
                   "Abstract\tbond\tBasic\tBiology-inspired\n"
                   'Arts\ta sign that says "Deep Learning"\tWriting & Symbols\t\n'
                   "Abstract\tbond\tBasic\tduplicate\n")
    assert S.read_prompts(str(tsv)) == ["bond", 'a sign that says "Deep Learning"']
    txt = tmp_path / "parti.txt"  # detected by its header, whatever the extension
    txt.write_text(tsv.read_text())
    assert S.read_prompts(str(txt)) == ["bond", 'a sign that says "Deep Learning"']
    (tmp_path / "bad.tsv").write_text("Category\tText\nA\tb\n")
    with pytest.raises(SystemExit, match="needs a Prompt column"):
        S.read_prompts(str(tmp_path / "bad.tsv"))
    # HPSv2 benchmark: one style's list, or a dict style -> list concatenated in the file's order
    (tmp_path / "anime.json").write_text(json.dumps(["a girl with a sword", "a dragon"]))
    assert S.read_prompts(str(tmp_path / "anime.json")) == ["a girl with a sword", "a dragon"]
    (tmp_path / "all.json").write_text('{"photo": ["p1", "p2"], "anime": ["a1"], "paintings": ["x", "p1"]}')
    assert S.read_prompts(str(tmp_path / "all.json")) == ["p1", "p2", "a1", "x"]
    for bad in ('{"photo": [1, 2]}', "[1]", "{not json"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(SystemExit) as err:
            S.read_prompts(str(tmp_path / "bad.json"))
        assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
    # a plain text file with tabs but no Prompt header stays one prompt per line
    (tmp_path / "plain.txt").write_text("a cat\tsitting\na dog\n")
    assert S.read_prompts(str(tmp_path / "plain.txt")) == ["a cat\tsitting", "a dog"]
