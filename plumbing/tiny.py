"""
The tiny presets' components, built in code from a fixed seed (no download): a real
CLIPTokenizer with a small vocabulary, tiny CLIP text encoders, a ~1M-parameter UNet, a tiny
AutoencoderKL, SD's noise schedule, and a tiny CLIP for E5. Every process that builds them gets
the same frozen parts; only the UNet is ever trained and saved. model.load_models calls build_tiny.
"""
import json
import os

import torch

from plumbing.images import BACKGROUNDS, COLOURS, SHAPES


TINY_SEED = 0  # the tiny presets' frozen parts must be identical in every process

# Tiny components, built in code
def tiny_tokenizer(max_length=16):
    """A real CLIPTokenizer (byte-level BPE) with a small vocabulary: every byte, plus
    whole-word tokens for the toy set's words (plumbing/images.py), so toy prompts are ~10 tokens and
    any other text still tokenizes, character by character."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab = ["<|startoftext|>", "<|endoftext|>"] + byte_chars + [c + "</w>" for c in byte_chars]
    merges, seen = [], set(vocab)
    words = ["a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS]
    for word in words:  # a chain of merges (b,a) (ba,c) ... spells each word as one token
        pieces = list(word)
        pieces[-1] += "</w>"
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            if cur not in seen:
                vocab.append(cur)
                seen.add(cur)
    ids = {v: i for i, v in enumerate(vocab)}
    try:
        return CLIPTokenizer(vocab=ids, merges=merges, model_max_length=max_length)  # transformers >= 5
    except TypeError:  # transformers 4.x builds it from files only
        import tempfile
        folder = tempfile.mkdtemp(prefix="tiny-tokenizer-")
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(ids, f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             model_max_length=max_length)

def tiny_text_config(vocab_size, max_length, hidden=32):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                          projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)

def tiny_unet_config(xl, vae):
    # ~1M parameters. Pixel space (3 channels) for tiny, 4 latent channels with a VAE.
    config = dict(sample_size=16, in_channels=4 if vae else 3, out_channels=4 if vae else 3,
                  block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8)
    if xl:  # SDXL's micro-conditioning: pooled text embedding + 6 time ids (SDXL paper, §2.2)
        config.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32)
    return config

def build_tiny(xl, vae):
    """Every component of a tiny preset, with fixed-seed random weights (no download)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        tokenizer = tiny_tokenizer()
        text_config = tiny_text_config(len(tokenizer), tokenizer.model_max_length)
        parts = dict(unet=UNet2DConditionModel(**tiny_unet_config(xl, vae)),
                     tokenizers=[tokenizer], text_encoders=[CLIPTextModel(text_config)], vae=None)
        if xl:
            parts["tokenizers"].append(tiny_tokenizer())
            parts["text_encoders"].append(CLIPTextModelWithProjection(text_config))
        if vae:
            parts["vae"] = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                                         down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    # SD's noise schedule for every tiny preset, pixel space included. DDPM's linear one
    # (ᾱ_T = 4e-5) was tried first for pixels: DDIM's x0 estimate divides by sqrt(ᾱ_t) ≈ 0.01
    # at the first steps, so a small model's ε errors were amplified 100x and samples diverged.
    # Spacing and offset are set explicitly, as the real SD/SDXL configs do: left unset, each
    # sampling scheduler built with from_config would pick its own default.
    parts["scheduler"] = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, clip_sample=False, timestep_spacing="leading", steps_offset=1)
    return parts

# The CLIP model behind the RPO weights (E5)
def tiny_clip():
    """The tiny CLIP (text: tiny_tokenizer + 2 layers of 32; vision: 16x16 pixels, 4x4 patches,
    2 layers of 32; joint space of 32) with fixed-seed random weights -> (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        tokenizer = tiny_tokenizer()
        config = CLIPConfig(
            text_config=tiny_text_config(len(tokenizer), tokenizer.model_max_length).to_dict(),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=4, projection_dim=32),
            projection_dim=32)
        return CLIPModel(config), tokenizer
