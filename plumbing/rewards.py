"""
The reward models' loading and batched feature passes, for evaluate.py (which holds each metric's
definition, docs/evaluation.md): CLIP image and text features, the LAION aesthetic head, HPSv2
and ImageReward. Optional packages that are missing or broken end in one line naming the install.
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import model as M
from plumbing import files, hub


HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # in the hub repo xswu/HPSv2

OPTIONAL_PACKAGES = {"hps": ("hpsv2", "hpsv2"), "imagereward": ("ImageReward", "image-reward")}  # import, pip

def missing_package(metric, err):
    module, pip_name = OPTIONAL_PACKAGES[metric]
    why = "" if getattr(err, "name", None) in (module, None) else f" (import failed: {hub.first_line(err)})"
    return SystemExit(f"error: --metrics {metric} needs the {module} package (pip install {pip_name}){why}")

def _batches(n, batch_size, desc):
    from tqdm.auto import tqdm
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch", file=sys.stderr, leave=False)

@torch.no_grad()
def clip_image_features(model, processor, paths, batch_size=32, desc="images"):
    """L2-normalised image embeddings, float32 (N, D) on the CPU. Images are read per batch."""
    device, feats = next(model.parameters()).device, []
    for i in _batches(len(paths), batch_size, desc):
        images = [files.open_rgb(p) for p in paths[i:i + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        out = M.clip_output(model.get_image_features(pixel_values=pixels))
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
        out = M.clip_output(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                     attention_mask=tok["attention_mask"].to(device)))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)

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
        local = files.url_cache_path(path, os.path.join(torch.hub.get_dir(), "checkpoints"))
        if not os.path.isfile(local):
            try:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                torch.hub.download_url_to_file(path, local, progress=False)
            except Exception as err:  # any network failure: one line, not a traceback
                raise SystemExit(f"error: cannot load the aesthetic head '{path}' ({hub.first_line(err)}); pass {flag}")
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
                         f"{hub.first_line(err)}); pass {flag}")
    if head.layers[0].in_features != embed_dim:
        raise SystemExit(f"error: the aesthetic head '{path}' takes {head.layers[0].in_features}-d embeddings but "
                         f"--aesthetic_clip gives {embed_dim}-d; pass a matching --aesthetic_head or --aesthetic_clip")
    return head.to(device).eval().requires_grad_(False)

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
            checkpoint = hf_hub_download("xswu/HPSv2", HPS_CHECKPOINTS[version], **hub.hub_kwargs())
        model, _, preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="amp", device=device, jit=False, force_quick_gelu=False,
            force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
            image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
            with_score_predictor=False, with_region_predictor=False)
        model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["state_dict"])
    except Exception as err:  # download, file or key errors: one line, not a traceback
        raise SystemExit(f"error: cannot load HPSv2 {version} '{checkpoint or 'xswu/HPSv2'}' "
                         f"({type(err).__name__}: {hub.first_line(err)}); pass {flag}")
    return dict(model=model.eval().requires_grad_(False), preprocess=preprocess, tokenizer=get_tokenizer("ViT-H-14"),
                device=torch.device(device))

@torch.no_grad()
def hps_scores(hps, paths, prompts, batch_size=32):
    """100 · cos of HPSv2's normalised image and text features, per (image, prompt); fp16
    autocast on CUDA as in hpsv2's code."""
    device, out = hps["device"], []
    for i in _batches(len(paths), batch_size, "hps"):
        images = torch.stack([hps["preprocess"](files.open_rgb(p)) for p in paths[i:i + batch_size]]).to(device)
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
        raise hub.cannot_load("ImageReward", name, "--imagereward_model /path/to/ImageReward.pt", err)

@torch.no_grad()
def imagereward_scores(model, paths, prompts, batch_size=32):
    """ImageReward's score(prompt, [images]) per prompt (the package encodes the prompt once)."""
    by_prompt = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    out = torch.zeros(len(paths))
    from tqdm.auto import tqdm
    for p, idx in tqdm(by_prompt.items(), desc="imagereward", unit="prompt", file=sys.stderr, leave=False):
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            r = model.score(p, [files.open_rgb(paths[k]) for k in chunk])
            out[chunk] = torch.tensor(r if isinstance(r, list) else [r], dtype=torch.float32)  # 1 image: a float
    return out
