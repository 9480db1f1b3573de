"""
The reward models' loading and batched feature passes, for evaluate.py (which holds each metric's
definition, docs/evaluation.md): CLIP image and text features, the LAION aesthetic head, HPSv2
(through open_clip) and ImageReward (through its package). Optional packages that are missing or
broken end in one line naming the install. Checkpoints that are pickles are read with
torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects.
"""
import importlib
import logging
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from plumbing import files, hub
from plumbing.images import CLIP_MEAN, CLIP_STD, clip_output


HPS_REPO = "xswu/HPSv2"  # the hub repo of the HPSv2 checkpoints (a model repo)
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"  # open_clip's name for the CLIP that HPSv2 fine-tuned (hpsv2/img_score.py builds this one)

# Optional packages: metric -> the module imported. Each is imported only when its metric is asked for.
OPTIONAL_PACKAGES = {"hps": "open_clip", "imagereward": "ImageReward"}
INSTALL = {
    "hps": "pip install -r requirements-eval.txt (open_clip_torch; its torchvision must be the build made for "
           "your torch)",
    # image-reward 1.5 imports apply_chunking_to_forward and friends from transformers.modeling_utils, which
    # transformers 4.56 and later no longer export, and imports the openai CLIP package (`clip`), which its
    # pip metadata does not install: docs/evaluation.md says what was checked and what is left to try.
    "imagereward": "image-reward 1.5 imports only with transformers<4.56, in an environment of its own: pip install "
                   "'transformers<4.56' 'huggingface_hub<1' 'setuptools<81' image-reward openai-clip "
                   "(docs/evaluation.md#imagereward)",
}


def missing_package(metric, err):
    """The one line for an optional package that is absent or fails at import (`err`, any exception)."""
    module = OPTIONAL_PACKAGES[metric]
    if isinstance(err, ImportError) and getattr(err, "name", None) == module:
        why = "is not installed"
    else:  # installed but broken: say how, since "not installed" would be false
        why = f"fails to import ({type(err).__name__}: {hub.first_line(err)})"
    return SystemExit(f"error: --metrics {metric} needs the {module} package, which {why}; {INSTALL[metric]}")


def import_optional(metric):
    """The optional package of `metric`, imported; else one line, never a traceback. Any exception
    counts, not only ImportError: a package can fail at import with anything (hpsv2 with
    FileNotFoundError for a data file its wheel lacks, torchvision built for another torch with
    RuntimeError)."""
    try:
        with hub.quiet():
            return importlib.import_module(OPTIONAL_PACKAGES[metric])
    except Exception as err:
        raise missing_package(metric, err)

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
        out = clip_output(model.get_image_features(pixel_values=pixels))
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
        out = clip_output(model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                     attention_mask=tok["attention_mask"].to(device)))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
    return torch.cat(feats)

def read_state_dict(path, what, flag):
    """A checkpoint's tensors: a .safetensors file, or a torch pickle read with
    torch.load(weights_only=True), which refuses any object that is not a tensor or a plain
    container. A training checkpoint's {'state_dict': ...} (HPSv2's) is unwrapped and a DDP
    "module." prefix dropped. Anything wrong ends in one line naming `flag`."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: cannot load {what} '{path}' (no such file); pass {flag}")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only met an object it will not build
        raise SystemExit(f"error: cannot load {what} '{path}': it holds more than tensors "
                         f"({type(err).__name__}: {hub.first_line(err)}); this project reads pickles with "
                         f"weights_only=True only. Where you trust the file, convert it once: python -m "
                         f"tools.to_safetensors {path} OUT.safetensors --trust_pickle, then pass "
                         f"{flag.split()[0]} OUT.safetensors")
    except Exception as err:  # not a checkpoint, cut short, a safetensors header that lies
        raise SystemExit(f"error: cannot load {what} '{path}' ({type(err).__name__}: {hub.first_line(err)}); "
                         f"pass {flag}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"error: cannot load {what} '{path}' (no state dict of tensors in it); pass {flag}")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
    torch.load(weights_only=True) (read_state_dict): tensors only, never arbitrary pickled objects. An http(s)
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
    state = read_state_dict(path, "the aesthetic head", flag)
    try:
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
    except Exception as err:  # missing or misshapen keys
        raise SystemExit(f"error: cannot load the aesthetic head '{path}' ({type(err).__name__}: "
                         f"{hub.first_line(err)}); pass {flag}")
    if head.layers[0].in_features != embed_dim:
        raise SystemExit(f"error: the aesthetic head '{path}' takes {head.layers[0].in_features}-d embeddings but "
                         f"--aesthetic_clip gives {embed_dim}-d; pass a matching --aesthetic_head or --aesthetic_clip")
    return head.to(device).eval().requires_grad_(False)

def load_hps(version, checkpoint, device):
    """HPSv2 (v2.0 or v2.1): open_clip's ViT-H-14, built without pretrained weights (the checkpoint
    holds every tensor, as hpsv2/img_score.py loads it with load_state_dict(checkpoint['state_dict'])),
    and open_clip's tokenizer for that model (77 tokens, the bundled BPE vocabulary). checkpoint: a
    local .pt or .safetensors file, or None to fetch the version's file from the hub repo xswu/HPSv2
    (from the local cache only when HF_HUB_OFFLINE is set)."""
    open_clip = import_optional("hps")
    flag = f"--hps_checkpoint /path/to/{HPS_CHECKPOINTS[version]} (or a .safetensors copy)"
    if checkpoint is None:
        try:
            from huggingface_hub import hf_hub_download
            with hub.quiet():
                checkpoint = hf_hub_download(HPS_REPO, HPS_CHECKPOINTS[version], local_files_only=hub.offline())
        except Exception as err:  # offline and not cached, no network, no such file
            raise SystemExit(f"error: cannot load HPSv2 {version} from the hub repo {HPS_REPO} "
                             f"({type(err).__name__}: {hub.first_line(err)}); pass {flag}")
    state = read_state_dict(checkpoint, f"the HPSv2 {version} checkpoint", flag)
    try:
        with hub.quiet():
            logging.disable(logging.WARNING)  # open_clip's "No pretrained weights loaded": the checkpoint follows
            try:
                model = open_clip.create_model(HPS_ARCH, pretrained=None, precision="fp32", device="cpu")
            finally:
                logging.disable(logging.NOTSET)
        model.load_state_dict(state)
        tokenizer = open_clip.get_tokenizer(HPS_ARCH)
    except Exception as err:  # missing or misshapen keys: not an HPSv2 checkpoint
        raise SystemExit(f"error: cannot load the HPSv2 {version} checkpoint '{checkpoint}' into open_clip's "
                         f"{HPS_ARCH} ({type(err).__name__}: {hub.first_line(err)}); pass {flag}")
    size = model.visual.image_size
    return dict(model=model.to(device).eval().requires_grad_(False), tokenizer=tokenizer, device=torch.device(device),
                size=size[0] if isinstance(size, (tuple, list)) else size)


def hps_pixels(image, size):
    """HPSv2's own evaluation preprocessing (hpsv2/src/open_clip/transform.py: image_transform with
    resize_longest_max=True, which create_model_and_transforms(light_augmentation=True) returns):
    RGB in [0, 1]; the longer side resized to `size` (bicubic with antialiasing, what torchvision's
    tensor resize does by default since 0.17); the shorter side padded with zeros (black)
    centred, the odd pixel at the end; then OpenAI CLIP's mean and std. Not open_clip's own
    'longest' mode, which resizes the PIL image instead. -> (3, size, size) float32."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    h, w = x.shape[1:]
    scale = size / max(h, w)
    if scale != 1.0:
        h, w = round(h * scale), round(w * scale)
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    # HPSv2 pads only when it resized (an image whose longer side is already `size` would not
    # stack in a batch); here every image ends square
    x = F.pad(x, ((size - w) // 2, size - w - (size - w) // 2, (size - h) // 2, size - h - (size - h) // 2))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def hps_scores(hps, paths, prompts, batch_size=32):
    """100 · cos(image, text) of HPSv2's L2-normalised features, per (image, prompt): the diagonal
    of image_features @ text_features.T that HPSv2's benchmark reports ×100 (its hpsv2.score
    returns it without the 100). fp16 autocast on CUDA, as HPSv2 runs (precision 'amp')."""
    model, device, out = hps["model"], hps["device"], []
    for i in _batches(len(paths), batch_size, "hps"):
        images = torch.stack([hps_pixels(files.open_rgb(p), hps["size"]) for p in paths[i:i + batch_size]])
        text = hps["tokenizer"](list(prompts[i:i + batch_size]))
        with torch.autocast("cuda", enabled=device.type == "cuda"):
            image_features = model.encode_image(images.to(device), normalize=True)
            text_features = model.encode_text(text.to(device), normalize=True)
        out.append(100 * (image_features.float() * text_features.float()).sum(-1).cpu())
    return torch.cat(out)


def load_imagereward(name, device):
    """ImageReward through its package (ImageReward.load). Nothing is downloaded when
    HF_HUB_OFFLINE is set: `name` must then be a local ImageReward.pt with the package's
    med_config.json beside it, and the hub library's offline switch is on while the package
    builds its BLIP (whose BERT tokenizer then comes from the local cache or not at all). The
    package reads ImageReward.pt with torch.load's default, weights_only=True in torch 2.6 and later."""
    RM = import_optional("imagereward")
    flag = "--imagereward_model /path/to/ImageReward.pt (med_config.json beside it)"
    local = os.path.isfile(name)
    med_config = os.path.join(os.path.dirname(os.path.abspath(name)), "med_config.json") if local else None
    if hub.offline() and not (local and os.path.isfile(med_config)):
        why = f"{med_config} is missing" if local else "it is not a local file"
        raise SystemExit(f"error: cannot load ImageReward '{name}' with HF_HUB_OFFLINE set ({why}; the package would "
                         f"download it); pass {flag}")
    try:
        with hub.quiet(), hub.offline_everywhere():
            kw = dict(med_config=med_config) if med_config and os.path.isfile(med_config) else {}
            return RM.load(name, device=device, **kw)
    except Exception as err:  # RuntimeError for an unknown name, OSError for a failed download
        raise SystemExit(f"error: cannot load ImageReward '{name}' ({type(err).__name__}: {hub.first_line(err)}); "
                         f"pass {flag}")


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
