"""
Evaluation: score sample folders, tabulate mean ± std, win rates, plot training curves.

    python evaluate.py --images out/tuned --baseline out/base --metrics pickscore,hps,imagereward,aesthetic,clip,style
    python evaluate.py --images out/rpo out/dpo --labels rpo,dpo --metrics toy_style,toy_content --style winter
    python evaluate.py --curves rpo=runs/rpo dpo=runs/dpo --out curves.png

Real images (section 2): reward models score every image of a sample.py folder, which records
prompt and seed per image in samples.jsonl. With --baseline, images pair up by (prompt, seed):
the same prompt and initial noise through two models. Printed: per metric, mean ± std over
images per folder and the win rate of each folder over the baseline with a bootstrap 95%
interval; written: results.json (per-image scores too) and a bar chart next to it. Metrics:
pickscore, hps, imagereward, aesthetic, clip, style (a CLIP zero-shot style probability,
reported with clip to the prompt: content kept); hps and imagereward need their own packages.

What is read from a folder: only the images its samples.jsonl lists, and only if they lie inside
the folder (real paths, symlinks resolved: a listed '../x' or '/etc/x' is refused). Other files
there (grid.png, compare.png, notes) are ignored; a listed file that is not a readable image stops
the run with one line naming it, before any model loads: a score over fewer images than listed
would not be the folder's score, and win rates would pair different sets.

Toy part (Style Alignment on toy/__init__.py's procedural set, docs/method.md; metrics toy_style, toy_content,
...): a small CNN trained on procedural renders says, per image, whether the style shows (style
score) and whether the prompt's shape, colour and background are still there (content score).
It is trained once per (style, resolution, seed), cached, and refuses to score anything unless
its held-out accuracy is >= 0.95: a weak scorer would make every table below meaningless.
"""
import argparse
import codecs
import hashlib
import io
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from plumbing.images import image_to_tensor
import model as M
import toy

# ----------------------------------------------------------------------------------------------
# 1. Toy scorer

PROMPT_RE = toy._PROMPT_RE  # parse prompts exactly as render_toy does
HEADS = {"style": 1, "shape": 3, "colour": 6, "background": 4}  # logits per head, in this order
# Content attributes that survive each style. "sketch" is grayscale on paper: the fill tone is
# 0.12·(255 - luma), so red, purple and blue (lumas 84..99) land within 2 grey levels, and the
# four backgrounds within 6..13 levels, about the brightness jitter below. A scorer trained to
# read them from sketches anyway got colour 0.45-0.57 and background 0.80-0.86 on held-out
# sketches, so for sketch only the shape counts (for plain and styled images alike, so that
# content means the same thing for both).
KEEPS = {"winter": ("shape", "colour", "background"), "sketch": ("shape",)}
TRAIN = dict(steps=1500, batch=128, lr=3e-3, pool=16384, check_every=100, stop_at=0.99)
VERSION = 1  # bump when the architecture, data or augmentation changes: invalidates caches
THRESHOLD = 0.95


def toy_labels(prompt):
    """'a red circle on a gray background' -> (shape, colour, background) indices."""
    m = PROMPT_RE.match(prompt)
    if not m or m[1] not in toy.COLOURS or m[2] not in toy.SHAPES or m[3] not in toy.BACKGROUNDS:
        raise ValueError(f"toy scorer: not a toy prompt: {prompt!r}")
    return toy.SHAPES.index(m[2]), list(toy.COLOURS).index(m[1]), list(toy.BACKGROUNDS).index(m[3])


def toy_scorer_net():
    # ~48k params. Two stride-2 convs take 16x16 to 4x4 with a receptive field covering the
    # whole shape; global average AND max pooling make it position-invariant (shapes move) while
    # keeping both area statistics (background, colour, blue cast) and sparse peaks (snow).
    def block(i, o, s):
        return [torch.nn.Conv2d(i, o, 3, s, 1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
    pool = torch.nn.ModuleList([torch.nn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveMaxPool2d(1)])
    trunk = torch.nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 48, 2), *block(48, 64, 1))
    return torch.nn.ModuleDict(dict(trunk=trunk, pool=pool, head=torch.nn.Linear(128, sum(HEADS.values()))))


def toy_logits(net, x):
    h = net["trunk"](x)
    h = torch.cat([p(h).flatten(1) for p in net["pool"]], dim=1)
    return dict(zip(HEADS, net["head"](h).split(list(HEADS.values()), dim=1)))


def toy_renders(n, style, resolution, seed):
    """n renders of random prompts from all 72, styled with p=0.5 -> (x [-1,1], labels dict)."""
    rng, prompts = np.random.default_rng(seed), toy.toy_prompts("all")
    imgs, labels = [], {k: [] for k in HEADS}
    for _ in range(n):
        prompt = prompts[rng.integers(len(prompts))]
        img, styled = toy.render_toy(prompt, resolution, rng), rng.random() < 0.5
        imgs.append(toy.apply_style(img, style, rng) if styled else img)
        for k, v in zip(("style", "shape", "colour", "background"), (int(styled), *toy_labels(prompt))):
            labels[k].append(v)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, {k: torch.tensor(v) for k, v in labels.items()}


def augment(x, g):
    """What diffusion samples do to a clean render: Gaussian noise of random strength (σ up to
    0.15 in [-1,1] units, per image), a small brightness offset and contrast change about the
    image mean, then the clamp that saving a sample applies."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.85, 1.15) + mean + u(-0.08, 0.08)
    return (x + u(0, 0.15) * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def toy_loss(out, y, style):
    # Content heads learn from plain images always and from styled ones only where the style
    # keeps that attribute (KEEPS): winter keeps all three, so they learn its shifted colours.
    loss = F.binary_cross_entropy_with_logits(out["style"][:, 0], y["style"].float())
    for k in ("shape", "colour", "background"):
        mask = (y["style"] == 0) | (k in KEEPS[style])
        loss = loss + F.cross_entropy(out[k][mask], y[k][mask])
    return loss


@torch.no_grad()
def toy_accuracy(net, x, y, style):
    net.eval()
    out = toy_logits(net, x)
    acc = {"style": ((out["style"][:, 0] > 0).long() == y["style"]).float().mean().item()}
    for k in ("shape", "colour", "background"):
        mask = (y["style"] == 0) | (k in KEEPS[style])
        acc[k] = (out[k][mask].argmax(1) == y[k][mask]).float().mean().item()
    return acc


def train_toy_scorer(style, resolution, seed):
    """Seeded CPU training on a fixed pool of renders with fresh augmentation every batch. Stops
    early once a validation set (its own seed, not the held-out one) reaches TRAIN['stop_at']."""
    with torch.random.fork_rng(devices=[]):  # seed the init without moving the caller's RNG
        torch.manual_seed(seed)
        net = toy_scorer_net()
    g = torch.Generator().manual_seed(seed)
    x, y = toy_renders(TRAIN["pool"], style, resolution, [seed, 0])
    xv, yv = toy_renders(1000, style, resolution, [seed, 1])
    xv = augment(xv, torch.Generator().manual_seed(1000 * seed + 1))
    opt = torch.optim.AdamW(net.parameters(), lr=TRAIN["lr"], weight_decay=1e-4)
    for step in range(1, TRAIN["steps"] + 1):
        net.train()
        idx = torch.randint(len(x), (TRAIN["batch"],), generator=g)
        loss = toy_loss(toy_logits(net, augment(x[idx], g)), {k: v[idx] for k, v in y.items()}, style)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % TRAIN["check_every"] == 0 and min(toy_accuracy(net, xv, yv, style).values()) >= TRAIN["stop_at"]:
            break
    net.eval()
    return net, step


def heldout_accuracy(net, style, resolution, seed):
    """Accuracy on 1000 renders (all 72 prompts) from seeds that no training or validation draw
    uses, augmented like the training batches: the scorer must be right on noisy images too."""
    x, y = toy_renders(1000, style, resolution, [seed, 2])
    return toy_accuracy(net, augment(x, torch.Generator().manual_seed(1000 * seed + 2)), y, style)


def check_accuracy(acc, threshold=THRESHOLD):
    bad = {k: v for k, v in acc.items() if v < threshold}
    if bad:
        raise SystemExit(f"error: toy scorer accuracy {', '.join(f'{k}={v:.3f}' for k, v in bad.items())} "
                         f"< {threshold} on held-out renders; refusing to report scores from a weak scorer")


def load_toy_scorer(style="winter", resolution=16, cache=None, seed=0):
    """Train (or load from cache) the toy scorer; gate on held-out accuracy -> (net, accuracy)."""
    if style not in toy.STYLES:
        raise SystemExit(f"error: unknown style {style!r}; expected one of {toy.STYLES}")
    cache = cache or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache",
                                  f"toy_scorer_{style}_{resolution}.safetensors")
    meta_path = os.path.splitext(cache)[0] + ".json"
    config = dict(version=VERSION, style=style, resolution=resolution, seed=seed, **TRAIN)
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) and os.path.isfile(cache) else {}
    net = toy_scorer_net()
    with M.one_thread():
        if meta.get("config") == config:
            net.load_state_dict(load_file(cache))
            net.eval()
            steps, how = meta.get("train_steps"), f"loaded {cache}"
        else:
            t0 = time.time()
            net, steps = train_toy_scorer(style, resolution, seed)
            how = f"trained {steps} steps in {time.time() - t0:.1f}s"
        acc = heldout_accuracy(net, style, resolution, seed)
    print(f"toy scorer ({style}, {resolution}px, {how}): held-out accuracy "
          + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), file=sys.stderr)
    check_accuracy(acc)
    if meta.get("config") != config:  # save only a scorer that passed the gate
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, cache)
        with open(meta_path, "w") as f:
            json.dump({"config": config, "accuracy": acc, "train_steps": steps}, f, indent=1)
    net.style, net.resolution = style, resolution  # what score_toy needs besides the weights
    return net, acc


@torch.no_grad()
def score_toy(scorer, images, prompts):
    """Per-image scores. images: float (N,3,H,W) in [-1,1] or uint8 (N,H,W,3); resized to the
    scorer's training resolution with area averaging (= PIL BOX for integer factors)."""
    if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
        images = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if len(images) != len(prompts):
        raise ValueError(f"score_toy: {len(images)} images but {len(prompts)} prompts")
    x, R = images.float().clamp(-1, 1), scorer.resolution
    if x.shape[-2:] != (R, R):
        x = F.interpolate(x, size=(R, R), mode="area")
    with M.one_thread():
        out = toy_logits(scorer, x)
    labels = torch.tensor([toy_labels(p) for p in prompts]).reshape(-1, 3)
    prob = torch.sigmoid(out["style"][:, 0])
    scores = {"style": (prob > 0.5).float(), "style_prob": prob}  # style: called styled (its mean: a share)
    for i, k in enumerate(("shape", "colour", "background")):
        scores[f"{k}_ok"] = (out[k].argmax(1) == labels[:, i]).float()
    scores["content"] = torch.stack([scores[f"{k}_ok"] for k in KEEPS[scorer.style]]).prod(0)
    return scores


# ----------------------------------------------------------------------------------------------
# 2. Reward models for real images
#
# Per image, each score follows the convention of the model's own release, so that numbers can
# be set next to published ones. cos(u, v) below is the cosine of the two embeddings, i.e. the
# dot product after L2 normalisation; "CLIP" means a transformers CLIPModel whose inputs are made
# by its transformers CLIPProcessor (AutoProcessor: a hub id or a local folder).
#   pickscore    PickScore_v1 (Kirstain et al. 2023, a CLIP ViT-H/14 fine-tuned on Pick-a-Pic),
#                preprocessed by the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor:
#                logit_scale.exp() · cos(text, image), as the PickScore repo's inference snippet.
#   clip         CLIP score with openai/clip-vit-large-patch14: max(100 · cos(text, image), 0), the
#                torchmetrics CLIPScore convention (Hessel et al. 2021 scale by 2.5 instead of 100).
#   aesthetic    LAION improved-aesthetic-predictor (christophschuhmann/improved-aesthetic-predictor):
#                the MLP head sac+logos+ava1-l14-linearMSE applied to the L2-normalised CLIP
#                ViT-L/14 image embedding; roughly a 1-10 rating.
#   style        Style Alignment on real images: CLIP zero-shot probability of the style text against
#                a neutral text, softmax over [style, neutral] of logit_scale.exp() · cos(image, text),
#                always reported next to `clip` to the prompt (does the content survive the style?).
#   hps          HPSv2 (Wu et al. 2023) through the hpsv2 package's own open_clip ViT-H/14 and
#                checkpoint: 100 · cos(text, image), as its benchmark (hpsv2.evaluate) reports it;
#                hpsv2.score returns the same without the factor 100.
#   imagereward  ImageReward-v1.0 (Xu et al. 2023) through the ImageReward package:
#                model.score(prompt, images), its reward standardised by the package's mean and std.
# Every model is loaded once, before any image is read; CLIP ViT-L/14 serves clip, style and
# aesthetic alike; image and text features are computed in batches on --device.

REWARD_METRICS = ("pickscore", "hps", "imagereward", "aesthetic", "clip", "style")
REWARD_DEFAULTS = dict(
    pickscore_model="yuvalkirstain/PickScore_v1",
    pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    clip_model="openai/clip-vit-large-patch14",
    # The published head (a 4.5 MB state dict), downloaded once into torch's hub cache.
    aesthetic_head="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                   "sac%2Blogos%2Bava1-l14-linearMSE.pth",
    hps_version="v2.1",
    imagereward_model="ImageReward-v1.0",
)
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # in the hub repo xswu/HPSv2
STYLE_TEXTS = {"vangogh": "a Van Gogh painting", "sketch": "a pencil sketch", "winter": "a winter scene"}
NEUTRAL_TEXT = "a photo"
OPTIONAL_PACKAGES = {"hps": ("hpsv2", "hpsv2"), "imagereward": ("ImageReward", "image-reward")}  # import, pip


def cannot_load(what, name, flag, err):
    return SystemExit(f"error: cannot load {what} '{name}' ({M.first_line(err)}); pass {flag} /path/to/a/local/copy")


def missing_package(metric, err):
    module, pip_name = OPTIONAL_PACKAGES[metric]
    why = "" if getattr(err, "name", None) in (module, None) else f" (import failed: {M.first_line(err)})"
    return SystemExit(f"error: --metrics {metric} needs the {module} package (pip install {pip_name}){why}")


def _hub_kwargs():
    return dict(local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")


def load_clip(name, flag, what, device, processor=None, processor_flag=None):
    """A CLIPModel (hub id or local folder) and the processor that prepares its inputs (by default
    from the same place) -> (model in eval mode on `device`, processor)."""
    from transformers import AutoProcessor, CLIPModel
    try:
        model = CLIPModel.from_pretrained(name, **_hub_kwargs())
    except (OSError, ValueError) as err:
        raise cannot_load(what, name, flag, err)
    try:
        proc = AutoProcessor.from_pretrained(processor or name, **_hub_kwargs())
    except (OSError, ValueError) as err:
        raise cannot_load(f"the processor of {what}", processor or name, processor_flag or flag, err)
    return model.to(device).eval().requires_grad_(False), proc


def _open_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # e.g. a truncated PNG
        raise SystemExit(f"error: {path}: not a readable image ({type(err).__name__}: {M.first_line(err)})")


def read_utf8(path):
    """A text file's content (a UTF-8 BOM dropped). Anything else ends in one line naming the file,
    line and column of the first byte that is not UTF-8: guessing another encoding could turn a
    prompt into different text without a word."""
    with open(path, "rb") as f:
        raw = f.read()
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise SystemExit(f"error: {path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
                         f"save the file as UTF-8")


def path_inside(folder, name):
    """FOLDER/NAME if its real path (symlinks resolved) lies inside FOLDER's, else None: a
    samples.jsonl must not make us read (or show) files from elsewhere."""
    root = os.path.realpath(folder)
    try:
        path = os.path.realpath(os.path.join(root, name))
    except ValueError:  # a NUL byte in the name: no path at all
        return None
    return path if os.path.commonpath([root, path]) == root else None


def url_cache_path(url, cache_dir):
    """Where a download from URL is cached: CACHE_DIR/<hash>-<file name>. The name is sanitised
    (decoded, last component only, no leading dots, [A-Za-z0-9._+-]) so that no URL can choose a
    path outside CACHE_DIR; the hash of the whole URL keeps two URLs with one file name apart."""
    from urllib.parse import unquote, urlsplit
    name = os.path.basename(unquote(urlsplit(url).path).replace("\\", "/"))
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "download"
    return os.path.join(cache_dir, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")


def _batches(n, batch_size, desc):
    from tqdm.auto import tqdm
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", file=sys.stderr, leave=False)


@torch.no_grad()
def clip_image_features(model, processor, paths, batch_size=32, desc="images"):
    """L2-normalised image embeddings, float32 (N, D) on the CPU. Images are read per batch."""
    device, feats = next(model.parameters()).device, []
    for i in _batches(len(paths), batch_size, desc):
        images = [_open_rgb(p) for p in paths[i:i + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        out = M._features(model.get_image_features(pixel_values=pixels))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def clip_text_features(model, processor, texts, batch_size=32):
    """L2-normalised text embeddings, float32 (N, D) on the CPU. Texts longer than the model's
    context (77 tokens for real CLIPs) are truncated, padding goes to the longest in the batch
    (PickScore's snippet: padding=True, truncation=True, max_length=77)."""
    device, feats = next(model.parameters()).device, []
    max_length = model.config.text_config.max_position_embeddings
    for i in range(0, len(texts), batch_size):
        tok = processor(text=list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out = M._features(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                     attention_mask=tok["attention_mask"].to(device)))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)


def pickscore(text_feats, image_feats, logit_scale):
    """PickScore: logit_scale.exp() · cos(text, image), per row of two normalised (N, D) tensors."""
    return logit_scale.detach().float().cpu().exp() * (text_feats * image_feats).sum(-1)


def clip_score(text_feats, image_feats):
    """CLIP score: max(100 · cos(text, image), 0), per row."""
    return (100 * (text_feats * image_feats).sum(-1)).clamp(min=0)


def style_probability(image_feats, style_feat, neutral_feat, logit_scale):
    """CLIP zero-shot: P(style text | image) = softmax over [style, neutral] of logit_scale.exp() ·
    cos(image, text), the zero-shot classifier of the CLIP paper with two classes."""
    texts = torch.stack([style_feat.reshape(-1), neutral_feat.reshape(-1)])  # (2, D)
    logits = logit_scale.detach().float().cpu().exp() * image_feats @ texts.T
    return logits.softmax(dim=-1)[:, 0]


class AestheticHead(torch.nn.Module):
    """The LAION improved-aesthetic-predictor MLP (its simple_inference.py), keys layers.0/2/4/6/7.
    Five Linear layers and no activation between them (as published); the dropouts act only in
    training. Input: the L2-normalised CLIP image embedding, 768-d for ViT-L/14 (the published
    head); `input_size` follows the checkpoint, so a tiny CLIP can have a tiny head."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_head(path, embed_dim, device="cpu"):
    """Head weights from a .safetensors file, or the published .pth read with
    torch.load(weights_only=True): tensors only, never arbitrary pickled objects. An http(s)
    URL is downloaded once into torch's hub cache (checkpoints/, a name from url_cache_path)."""
    flag = "--aesthetic_head /path/to/sac+logos+ava1-l14-linearMSE.pth (or .safetensors)"
    if path.startswith(("http://", "https://")):
        local = url_cache_path(path, os.path.join(torch.hub.get_dir(), "checkpoints"))
        if not os.path.isfile(local):
            try:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                torch.hub.download_url_to_file(path, local, progress=False)
            except Exception as err:  # any network failure: one line, not a traceback
                raise SystemExit(f"error: cannot load the aesthetic head '{path}' ({M.first_line(err)}); pass {flag}")
        path = local
    if not os.path.isfile(path):
        raise SystemExit(f"error: cannot load the aesthetic head '{path}' (no such file); pass {flag}")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
    except Exception as err:  # unpicklable objects, missing or misshapen keys
        raise SystemExit(f"error: cannot load the aesthetic head '{path}' ({type(err).__name__}: "
                         f"{M.first_line(err)}); pass {flag}")
    if head.layers[0].in_features != embed_dim:
        raise SystemExit(f"error: the aesthetic head '{path}' takes {head.layers[0].in_features}-d embeddings but "
                         f"--aesthetic_clip gives {embed_dim}-d; pass a matching --aesthetic_head or --aesthetic_clip")
    return head.to(device).eval().requires_grad_(False)


@torch.no_grad()
def aesthetic_score(head, image_feats):
    """LAION aesthetic score of normalised CLIP image embeddings (N, D) -> (N,)."""
    param = next(head.parameters())
    return head(image_feats.to(param.device, param.dtype)).float().cpu()


def load_hps(version, checkpoint, device):
    """HPSv2's open_clip ViT-H/14 with its checkpoint, built as hpsv2's own benchmark code builds
    it (hpsv2/evaluation.py: no LAION weights first, since the checkpoint holds every tensor)."""
    try:
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    except ImportError as err:
        raise missing_package("hps", err)
    flag = "--hps_checkpoint /path/to/" + HPS_CHECKPOINTS[version]
    try:
        if checkpoint is None:
            from huggingface_hub import hf_hub_download
            checkpoint = hf_hub_download("xswu/HPSv2", HPS_CHECKPOINTS[version], **_hub_kwargs())
        model, _, preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="amp", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False)
        model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["state_dict"])
    except Exception as err:  # download, file or key errors: one line, not a traceback
        raise SystemExit(f"error: cannot load HPSv2 {version} '{checkpoint or 'xswu/HPSv2'}' "
                         f"({type(err).__name__}: {M.first_line(err)}); pass {flag}")
    return dict(model=model.eval().requires_grad_(False), preprocess=preprocess, tokenizer=get_tokenizer("ViT-H-14"),
                device=torch.device(device))


@torch.no_grad()
def hps_scores(hps, paths, prompts, batch_size=32):
    """100 · cos of HPSv2's normalised image and text features, per (image, prompt); fp16
    autocast on CUDA as in hpsv2's code."""
    device, out = hps["device"], []
    for i in _batches(len(paths), batch_size, "hps"):
        images = torch.stack([hps["preprocess"](_open_rgb(p)) for p in paths[i:i + batch_size]]).to(device)
        text = hps["tokenizer"](list(prompts[i:i + batch_size])).to(device)
        with torch.autocast("cuda", enabled=device.type == "cuda"):
            feats = hps["model"](images, text)
        out.append(100 * (feats["image_features"].float() * feats["text_features"].float()).sum(-1).cpu())
    return torch.cat(out)


def load_imagereward(name, device):
    try:
        import ImageReward as RM
    except ImportError as err:
        raise missing_package("imagereward", err)
    try:
        return RM.load(name, device=device)
    except Exception as err:  # RuntimeError for an unknown name, OSError for a failed download
        raise cannot_load("ImageReward", name, "--imagereward_model /path/to/ImageReward.pt", err)


@torch.no_grad()
def imagereward_scores(model, paths, prompts, batch_size=32):
    """model.score(prompt, [images]) per prompt (the package encodes the prompt once)."""
    by_prompt = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    out = torch.zeros(len(paths))
    from tqdm.auto import tqdm
    for p, idx in tqdm(by_prompt.items(), desc="imagereward", unit="prompt", file=sys.stderr, leave=False):
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            r = model.score(p, [_open_rgb(paths[k]) for k in chunk])
            out[chunk] = torch.tensor(r if isinstance(r, list) else [r], dtype=torch.float32)  # 1 image: a float
    return out


def load_reward_models(metrics, args, device):
    """Every model the metrics need, each loaded once: -> {role: model or (model, processor)}.
    Optional packages are checked first, so a missing one fails before any download."""
    for m in metrics:
        if m in OPTIONAL_PACKAGES:
            try:
                __import__(OPTIONAL_PACKAGES[m][0])
            except ImportError as err:
                raise missing_package(m, err)
    clips, models = {}, {}

    def clip(name, flag, what, processor=None, processor_flag=None):
        key = (name, processor or name)
        if key not in clips:
            clips[key] = load_clip(name, flag, what, device, processor, processor_flag)
        return clips[key]

    if "pickscore" in metrics:
        models["pickscore"] = clip(args.pickscore_model, "--pickscore_model", "PickScore", args.pickscore_processor,
                                   "--pickscore_processor")
    if "clip" in metrics or "style" in metrics:
        models["clip"] = clip(args.clip_model, "--clip_model", "CLIP")
    if "aesthetic" in metrics:  # CLIP ViT-L/14 by default: the same object as models["clip"]
        models["aesthetic_clip"] = clip(args.aesthetic_clip or args.clip_model, "--aesthetic_clip",
                                        "the aesthetic predictor's CLIP")
        dim = models["aesthetic_clip"][0].config.projection_dim
        models["aesthetic_head"] = load_aesthetic_head(args.aesthetic_head, dim, device)
    if "hps" in metrics:
        models["hps"] = load_hps(args.hps_version, args.hps_checkpoint, device)
    if "imagereward" in metrics:
        models["imagereward"] = load_imagereward(args.imagereward_model, device)
    return models


def score_rewards(models, paths, prompts, metrics, style_text=STYLE_TEXTS["vangogh"], neutral_text=NEUTRAL_TEXT,
                  batch_size=32):
    """Per-image scores {metric: float32 tensor (N,)} for images `paths` made from `prompts`."""
    image_cache, scores = {}, {}
    unique = list(dict.fromkeys(prompts))  # each prompt's text features once, whatever its seeds
    index = {p: i for i, p in enumerate(unique)}
    where = torch.tensor([index[p] for p in prompts])

    def image_feats(role):  # one pass over the images per CLIP model, shared between metrics
        model, proc = models[role]
        if id(model) not in image_cache:
            image_cache[id(model)] = clip_image_features(model, proc, paths, batch_size, desc=role)
        return image_cache[id(model)]

    def prompt_feats(role):
        model, proc = models[role]
        return clip_text_features(model, proc, unique, batch_size)[where]

    if "pickscore" in metrics:
        scores["pickscore"] = pickscore(prompt_feats("pickscore"), image_feats("pickscore"),
                                        models["pickscore"][0].logit_scale)
    if "clip" in metrics or "style" in metrics:
        scores["clip"] = clip_score(prompt_feats("clip"), image_feats("clip"))
    if "style" in metrics:
        model, proc = models["clip"]
        style, neutral = clip_text_features(model, proc, [style_text, neutral_text])
        scores["style"] = style_probability(image_feats("clip"), style, neutral, model.logit_scale)
    if "aesthetic" in metrics:
        scores["aesthetic"] = aesthetic_score(models["aesthetic_head"], image_feats("aesthetic_clip"))
    if "hps" in metrics:
        scores["hps"] = hps_scores(models["hps"], paths, prompts, batch_size)
    if "imagereward" in metrics:
        scores["imagereward"] = imagereward_scores(models["imagereward"], paths, prompts, batch_size)
    return {m: scores[m] for m in metrics}


# ----------------------------------------------------------------------------------------------
# 3. Tables. Toy metrics: per model, mean ± std over seeds of each seed's mean over its images.
#    Reward metrics: per folder, mean ± std over images, and win rates over (prompt, seed) pairs.


def summarize(values_per_seed):
    """-> (mean, sample std with ddof=1); the spread between seeds, so 0.0 for a single seed."""
    v = np.asarray(values_per_seed, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown_table(rows, columns):
    def cell(v):
        if isinstance(v, tuple):
            return f"{v[0]:.3f} ± {v[1]:.3f}"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def read_index(folder):
    """A sample.py output folder's samples.jsonl -> records (dicts with prompt, seed, file and
    path = the image's path). Every listed file must lie inside the folder and be an image (its
    header is read here, so a bad folder fails before any model loads)."""
    index = os.path.join(folder, "samples.jsonl")
    if not os.path.isfile(index):
        raise SystemExit(f"error: {folder}: no samples.jsonl (not a sample.py output folder?)")
    records = []
    for n, line in enumerate(io.StringIO(read_utf8(index), newline=None), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"error: {index}:{n}: not valid JSON")
        if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "seed", "file")):
            raise SystemExit(f"error: {index}:{n}: needs the keys prompt, seed and file")
        if not (isinstance(rec["prompt"], str) and isinstance(rec["file"], str) and rec["file"]
                and isinstance(rec["seed"], int) and not isinstance(rec["seed"], bool)):
            raise SystemExit(f"error: {index}:{n}: prompt and file must be text, seed an integer")
        rec["path"] = path_inside(folder, rec["file"])
        if rec["path"] is None:
            raise SystemExit(f"error: {index}:{n}: image path {rec['file']!r} points outside {folder}; "
                             f"evaluate.py reads only files inside the folder it is given")
        if not os.path.isfile(rec["path"]):
            raise SystemExit(f"error: {index}:{n}: image file {rec['path']} is missing")
        try:
            Image.open(rec["path"]).close()  # the header only: cheap, and catches a non-image
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise SystemExit(f"error: {index}:{n}: {rec['file']} is not an image ({M.first_line(err)})")
        records.append(rec)
    if not records:
        raise SystemExit(f"error: {index} lists no samples")
    return records


def load_samples(folder, resolution):
    """A sample.py output folder -> (images (N,3,R,R) in [-1,1], prompts, seeds)."""
    images, prompts, seeds = [], [], []
    for rec in read_index(folder):
        path = rec["path"]
        im = _open_rgb(path)
        if im.size != (resolution, resolution):
            if min(im.size) < resolution:
                raise SystemExit(f"error: {path} is {im.size[0]}x{im.size[1]}, smaller than the "
                                 f"scorer's {resolution}px; pass --resolution")
            im = im.resize((resolution, resolution), Image.BOX)  # box = the renders' own filter
        images.append(image_to_tensor(im))
        prompts.append(rec["prompt"])
        seeds.append(rec["seed"])
    return torch.stack(images), prompts, seeds


def evaluate_folder(folder, label, scorer, metrics):
    """Toy metrics (TOY_METRICS names, e.g. toy_style = score_toy's "style") of one folder."""
    images, prompts, seeds = load_samples(folder, scorer.resolution)
    try:
        scores = score_toy(scorer, images, prompts)
    except ValueError as e:
        raise SystemExit(f"error: {folder}: {e}")
    run = {"label": label, "dir": folder, "n_images": len(prompts), "metrics": {}}
    for m in metrics:
        per_seed = {str(s): scores[m.removeprefix("toy_")][[i for i, t in enumerate(seeds) if t == s]].mean().item()
                    for s in sorted(set(seeds))}
        mean, std = summarize(list(per_seed.values()))
        run["metrics"][m] = {"mean": mean, "std": std, "per_seed": per_seed}
    return run


def pair_indices(keys_a, keys_b):
    """Match images of two folders by key ((prompt, seed): the same noise and prompt, so the same
    starting point for both models) -> (indices into A, indices into B), in A's order."""
    where_b = {k: i for i, k in enumerate(keys_b)}
    pairs = [(i, where_b[k]) for i, k in enumerate(keys_a) if k in where_b]
    return [i for i, _ in pairs], [j for _, j in pairs]


def win_outcomes(a, b):
    """Per pair: 1 if a > b, 0.5 for a tie, 0 if a < b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a > b) + 0.5 * (a == b)


def win_rate(a, b):
    """Share of pairs where A scores higher than B, ties counting half."""
    return float(win_outcomes(a, b).mean())


def bootstrap_interval(a, b, n=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of win_rate(a, b): resample the pairs with replacement n
    times (numpy, a fixed seed: the same inputs give the same interval) and take the
    (1-level)/2 and (1+level)/2 quantiles of the resampled win rates."""
    outcomes = win_outcomes(a, b)
    rng, rates = np.random.default_rng(seed), []
    per_draw = max(1, 10_000_000 // len(outcomes))  # bound memory at ~80 MB of indices
    for start in range(0, n, per_draw):
        idx = rng.integers(0, len(outcomes), size=(min(per_draw, n - start), len(outcomes)))
        rates.append(outcomes[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(rates), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def compare_runs(run, base, metrics, n_bootstrap=1000, seed=0):
    """Win rates of `run` over `base` on the (prompt, seed) pairs they share -> ({metric:
    {win_rate, ci95, pairs}}, {label: images without a match}). Unmatched images are left out
    of the win rates (their means still count) and reported with a one-line warning."""
    ia, ib = pair_indices([tuple(k) for k in run["keys"]], [tuple(k) for k in base["keys"]])
    unmatched = {run["label"]: run["n_images"] - len(ia), base["label"]: base["n_images"] - len(ib)}
    if not ia:
        raise SystemExit(f"error: no (prompt, seed) of {run['dir']} is in {base['dir']}: nothing to compare")
    if any(unmatched.values()):
        print(f"warning: {unmatched[run['label']]} images of {run['label']} and {unmatched[base['label']]} of "
              f"{base['label']} have no (prompt, seed) match; left out of the win rates", file=sys.stderr)
    wins = {}
    for m in metrics:
        a, b = np.asarray(run["scores"][m])[ia], np.asarray(base["scores"][m])[ib]
        wins[m] = {"win_rate": win_rate(a, b), "ci95": list(bootstrap_interval(a, b, n_bootstrap, seed)),
                   "pairs": len(ia)}
    return wins, unmatched


def reward_table(runs, metrics, win_rates=None, baseline=None):
    """Rows: metrics; columns: each folder's mean ± std over images, then per compared folder the
    win rate over the baseline with its bootstrap interval."""
    columns = ["metric"] + [f"{r['label']} (mean ± std)" for r in runs]
    win_cols = [(label, f"win rate {label} > {baseline} [95% CI]") for label in (win_rates or {})]
    columns += [c for _, c in win_cols]
    rows = []
    for m in metrics:
        row = {"metric": m, **{f"{r['label']} (mean ± std)": (r["metrics"][m]["mean"], r["metrics"][m]["std"])
                               for r in runs}}
        for label, col in win_cols:
            w = win_rates[label][m]
            row[col] = f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"
        rows.append(row)
    return markdown_table(rows, columns)


# ----------------------------------------------------------------------------------------------
# 4. Plots (matplotlib, Agg: files only, no display needed)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib")
    return plt


def plot_curves(runs, out_png, style_points=None):
    """runs {label: run_dir with train.py's metrics.jsonl}; style_points {label: [(step, score)]}.
    Saves a 1500x400 px PNG: loss, implicit accuracy and style score against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for i, (label, run_dir) in enumerate(runs.items()):
        path, colour = os.path.join(run_dir, "metrics.jsonl"), f"C{i}"
        if not os.path.isfile(path):
            raise SystemExit(f"error: {run_dir}: no metrics.jsonl (not a train.py output folder?)")
        with open(path) as f:
            log = [json.loads(line) for line in f if line.strip()]
        steps, loss = np.array([r["step"] for r in log]), np.array([r["loss"] for r in log])
        # Per-step losses are noisy (one t and ε draw per step): show a 20-step moving average.
        w = min(20, len(loss))
        axes[0].plot(steps, loss, color=colour, alpha=0.2, lw=0.8)
        axes[0].plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, "valid"), color=colour, label=label)
        acc = [(r["step"], r["implicit_acc"]) for r in log if "implicit_acc" in r]  # none for SFT
        if acc:
            axes[1].plot(*zip(*acc), color=colour, alpha=0.7, label=label)
        if style_points and style_points.get(label):
            axes[2].plot(*zip(*sorted(style_points[label])), "o-", color=colour, label=label)
    for ax, name in zip(axes, ("loss (20-step mean)", "implicit accuracy", "style score")):
        ax.set_xlabel("step")
        ax.set_title(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def plot_tradeoff(points, out_png):
    """points {method: [(lr, style_mean, style_std, content_mean, content_std)]} -> 600x500 PNG:
    style (x) against content (y), one line per method through its lr grid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for method, pts in points.items():
        lr, sm, ss, cm, cs = zip(*sorted(pts))
        ax.errorbar(sm, cm, xerr=ss, yerr=cs, fmt="o-", capsize=3, label=method)
        for p in zip(lr, sm, cm):
            ax.annotate(f"lr={p[0]:g}", p[1:], textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("style score")
    ax.set_ylabel("content score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def plot_scores(runs, metrics, out_png, win_rates=None):
    """Reward metrics as bars: one panel per metric (their scales differ), one bar per folder at
    its mean with the std over images as error bar; the panel title carries the win rate(s)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.5), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means = [r["metrics"][m]["mean"] for r in runs]
        stds = [r["metrics"][m]["std"] for r in runs]
        ax.bar(range(len(runs)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), [r["label"] for r in runs], rotation=20, fontsize=8)
        title = m
        for label, w in (win_rates or {}).items():
            title += f"\n{label} wins {w[m]['win_rate']:.2f} [{w[m]['ci95'][0]:.2f}, {w[m]['ci95'][1]:.2f}]"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 5. Command line

TOY_METRICS = ("toy_style", "toy_content", "toy_shape_ok", "toy_colour_ok", "toy_background_ok")


def folder_labels(args):
    """Row/column names: --labels (one per --images folder, optionally one more for --baseline),
    else the folder names, made unique with their paths when two folders share a name."""
    folders = args.images + ([args.baseline] if args.baseline else [])
    if args.labels:
        labels = args.labels.split(",")
        if len(labels) == len(args.images) and args.baseline:
            labels.append(os.path.basename(os.path.normpath(args.baseline)))
        if len(labels) != len(folders):
            raise SystemExit(f"error: {len(labels)} --labels for {len(folders)} folders (--images, then --baseline)")
    else:
        labels = [os.path.basename(os.path.normpath(d)) for d in folders]
        if len(set(labels)) < len(labels):
            labels = [os.path.normpath(d) for d in folders]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"error: labels must differ, got {','.join(labels)}")
    return folders, labels


def evaluate_toy(args, metrics):
    labels = folder_labels(args)[1]
    for d in args.images:  # fail on a bad folder before spending time on the scorer
        read_index(d)
    scorer, acc = load_toy_scorer(args.style, args.resolution, args.scorer_cache, args.scorer_seed)
    runs = [evaluate_folder(d, lab, scorer, metrics) for d, lab in zip(args.images, labels)]
    rows = [{"model": r["label"], "images": r["n_images"],
             **{m: (r["metrics"][m]["mean"], r["metrics"][m]["std"]) for m in metrics}} for r in runs]
    print(markdown_table(rows, ["model", "images", *metrics]), end="")
    out = args.out or "results.json"
    with open(out, "w") as f:
        json.dump({"style": args.style, "scorer_accuracy": acc, "runs": runs}, f, indent=1)
    return runs


def evaluate_rewards(args, metrics):
    """--images (and --baseline) scored by reward models: table on stdout, results.json, bar chart."""
    folders, labels = folder_labels(args)
    records = [read_index(d) for d in folders]  # bad folders fail before any model loads
    if args.baseline:
        for d, recs in zip(folders, records):
            keys = [(r["prompt"], r["seed"]) for r in recs]
            if len(set(keys)) < len(keys):
                raise SystemExit(f"error: {d}: a (prompt, seed) appears twice in samples.jsonl: ambiguous pairs")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    style_text = args.style_text or STYLE_TEXTS[args.style_name]
    models = load_reward_models(metrics, args, device)
    runs = []
    for d, label, recs in zip(folders, labels, records):
        print(f"scoring {len(recs)} images in {d} ({label})", file=sys.stderr)
        scores = score_rewards(models, [r["path"] for r in recs], [r["prompt"] for r in recs], metrics,
                               style_text, args.neutral_text, args.batch_size)
        runs.append({"label": label, "dir": d, "n_images": len(recs),
                     "keys": [[r["prompt"], r["seed"]] for r in recs],
                     "metrics": {m: dict(zip(("mean", "std"), summarize(scores[m].tolist()))) for m in metrics},
                     "scores": {m: scores[m].tolist() for m in metrics}})
    win_rates, unmatched = {}, {}
    for run in runs[:-1] if args.baseline else []:
        win_rates[run["label"]], unmatched[run["label"]] = compare_runs(run, runs[-1], metrics, args.bootstrap,
                                                                        args.bootstrap_seed)
    print(f"mean ± std over images (std with ddof=1); win rate: share of (prompt, seed) pairs where the first "
          f"scores higher, ties count half; 95% CI: percentile bootstrap over pairs, {args.bootstrap} resamples")
    print(reward_table(runs, metrics, win_rates, labels[-1] if args.baseline else None), end="")
    out = args.out or "results.json"
    used = {"pickscore": f"{args.pickscore_model} (processor {args.pickscore_processor})", "clip": args.clip_model,
            "style": f"{args.clip_model}: P('{style_text}' vs '{args.neutral_text}')",
            "aesthetic": f"{args.aesthetic_clip or args.clip_model} + {args.aesthetic_head}",
            "hps": f"HPSv2 {args.hps_version} {args.hps_checkpoint or 'xswu/HPSv2'}",
            "imagereward": args.imagereward_model}
    with open(out, "w") as f:
        json.dump({"metrics": metrics, "models": {m: used[m] for m in metrics}, "style_text": style_text,
                   "neutral_text": args.neutral_text, "baseline": labels[-1] if args.baseline else None,
                   "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95},
                   "std": "over images, ddof=1", "win_rates": win_rates, "unmatched": unmatched, "runs": runs},
                  f, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    try:
        plot_scores(runs, metrics, png, win_rates)
        print(f"wrote {out} and {png}", file=sys.stderr)
    except SystemExit as err:  # matplotlib is optional here: the table and the JSON are the results
        print(f"wrote {out}; no bar chart ({str(err).removeprefix('error: ')})", file=sys.stderr)
    return runs, win_rates


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those helps say what happens instead
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    """evaluate.py's flags (train.py --validation_reward_flags reads its reward-model group)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults)
    p.add_argument("--images", nargs="+",
                   help="sample.py output folders. Only the images each samples.jsonl lists are read, and only "
                        "inside the folder (a path leading out of it is refused); other files there are ignored; "
                        "a listed file that is not a readable image is an error naming it (nothing is skipped)")
    p.add_argument("--baseline", default=None,
                   help="reward metrics: a folder (e.g. the base model's) to pair with each --images folder by "
                        "(prompt, seed) for win rates")
    p.add_argument("--labels", default=None, help="comma-separated names, one per --images folder (then one for "
                                                  "--baseline, optional); default: folder names")
    p.add_argument("--metrics", default="toy_style,toy_content",
                   help=f"comma-separated. Toy set: {','.join(TOY_METRICS)}. Real images: {','.join(REWARD_METRICS)} "
                        "(style also reports clip: content kept). The two kinds go in separate runs")
    p.add_argument("--out", default=None, help="scoring: the JSON file, results.json by default (reward metrics also "
                                               "write a bar chart next to it, .json -> .png); --curves: curves.png")
    g = p.add_argument_group("reward models (real images)")
    g.add_argument("--pickscore_model", default=REWARD_DEFAULTS["pickscore_model"], help="hub id or local folder")
    g.add_argument("--pickscore_processor", default=REWARD_DEFAULTS["pickscore_processor"],
                   help="hub id or local folder")
    g.add_argument("--clip_model", default=REWARD_DEFAULTS["clip_model"],
                   help="CLIP for clip and style (and aesthetic, by default): hub id or local folder")
    g.add_argument("--aesthetic_clip", default=None, help="CLIP under the aesthetic head (default: --clip_model)")
    g.add_argument("--aesthetic_head", default=REWARD_DEFAULTS["aesthetic_head"],
                   help="the LAION head: .pth (read with weights_only=True) or .safetensors file, or URL")
    g.add_argument("--hps_version", default=REWARD_DEFAULTS["hps_version"], choices=list(HPS_CHECKPOINTS))
    g.add_argument("--hps_checkpoint", default=None, help="local HPS_v2*.pt (default: download from xswu/HPSv2)")
    g.add_argument("--imagereward_model", default=REWARD_DEFAULTS["imagereward_model"],
                   help="ImageReward name or local ImageReward.pt")
    g.add_argument("--style_name", default="vangogh", choices=list(STYLE_TEXTS),
                   help="style metric: " + ", ".join(f"{k} = '{v}'" for k, v in STYLE_TEXTS.items()))
    g.add_argument("--style_text", default=None, help="style metric: a description instead of --style_name's")
    g.add_argument("--neutral_text", default=NEUTRAL_TEXT, help="style metric: the description it competes with")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the win rates' 95%% CI")
    g.add_argument("--bootstrap_seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=32, help="images per model call")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    t = p.add_argument_group("toy scorer (procedural toy set)")
    t.add_argument("--style", default="winter", choices=list(toy.STYLES), help="the toy style the scorer detects")
    t.add_argument("--resolution", type=int, default=16, help="toy scorer input size")
    t.add_argument("--scorer_cache", default=None,
                   help="default: .cache/toy_scorer_{style}_{resolution}.safetensors next to this file")
    t.add_argument("--scorer_seed", type=int, default=0)
    c = p.add_argument_group("training curves")
    c.add_argument("--curves", nargs="+", metavar="LABEL=RUN_DIR", help="plot train.py metrics instead")
    c.add_argument("--style_points", default=None, help="--curves: JSON {label: [[step, style], ...]}")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.curves:
        runs = dict(c.split("=", 1) for c in args.curves if "=" in c)
        if len(runs) != len(args.curves):
            raise SystemExit("error: --curves takes LABEL=RUN_DIR pairs")
        points = json.load(open(args.style_points)) if args.style_points else None
        plot_curves(runs, args.out or "curves.png", points)
        return print(f"wrote {args.out or 'curves.png'}")
    if not args.images:
        raise SystemExit("error: give --images DIR [DIR ...] or --curves LABEL=RUN_DIR [...]")
    metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in TOY_METRICS + REWARD_METRICS]
    if unknown or not metrics:
        hint = " (the toy scorer's are now toy_style, toy_content)" if {"content"} & set(unknown) else ""
        raise SystemExit(f"error: unknown --metrics {','.join(unknown) or args.metrics!r}{hint}; toy set: "
                         f"{','.join(TOY_METRICS)}; real images: {','.join(REWARD_METRICS)}")
    toy_metrics = [m for m in metrics if m in TOY_METRICS]
    if toy_metrics and len(toy_metrics) < len(metrics):
        raise SystemExit("error: toy metrics (toy_*) and reward-model metrics go in separate runs")
    if toy_metrics:
        if args.baseline:
            raise SystemExit("error: --baseline (win rates) is for reward-model metrics; list toy folders in --images")
        return evaluate_toy(args, metrics)
    if args.bootstrap < 1 or args.batch_size < 1:
        raise SystemExit("error: --bootstrap and --batch_size must be at least 1")
    if "style" in metrics and "clip" not in metrics:
        metrics.append("clip")  # style without content would reward forgetting the prompt
    return evaluate_rewards(args, metrics)


if __name__ == "__main__":
    main()
