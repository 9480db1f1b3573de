"""
The real presets (sd15, sdxl) with random weights, for benchmarks with no download:
`--pretrained random` in train.py and bench/speed.py. The shapes are those of the real
config.json files, so that the UNet, VAE, text encoders and CLIP cost what the real ones cost.
The tokenizer is the tiny one at 77 tokens (the text encoders see the same (B, 77) ids shape;
the ids only index the random 49408-row embedding).
"""
import torch

from plumbing.tiny import tiny_tokenizer


# The real presets' UNet architectures (their unet/config.json, non-default fields), so that
# bench/speed.py can build them with random weights and no download. Text-encoder outputs they
# expect: sd15 hidden states (B, 77, 768); sdxl (B, 77, 2048) plus pooled (B, 1280) and 6 time ids.
ARCHITECTURES = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}

TEXT_SHAPES = {"sd15": dict(tokens=77, hidden=768), "sdxl": dict(tokens=77, hidden=2048, pooled=1280)}

# The real presets' frozen parts with random weights (bench/speed.py --pretrained random): the
# shapes of their config.json files, so that VAE, text encoders and CLIP cost what the real
# ones cost, with no download. The tokenizer is tiny_tokenizer at 77 tokens (the text encoders
# see the same (B, 77) ids shape; the ids only index the random 49408-row embedding).
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)

REAL_TEXT = {"clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, hidden_act="quick_gelu"),
             "bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          projection_dim=1280, hidden_act="gelu")}

REAL_CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")

def _real_text_config(kind):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **REAL_TEXT[kind])

def build_random_real(xl, resolution, device="cpu", encoders=True):
    """What hub.load_real returns for sd15 (xl False) or sdxl, built from the architectures with
    random weights on `device` (initialising 1-3B parameters on a CPU takes minutes; on a GPU, seconds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    with torch.device(device):
        parts = dict(unet=UNet2DConditionModel(**ARCHITECTURES["sdxl" if xl else "sd15"]), vae=None, text_encoders=[], tokenizers=[],
                     scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                             beta_start=0.00085, beta_end=0.012, clip_sample=False))
        if encoders:
            parts["vae"] = AutoencoderKL(**REAL_VAE, sample_size=resolution,
                                         scaling_factor=0.13025 if xl else 0.18215)
            parts["tokenizers"] = [tiny_tokenizer(77)]
            parts["text_encoders"] = [CLIPTextModel(_real_text_config("clip-l"))]
            if xl:
                parts["tokenizers"].append(tiny_tokenizer(77))
                parts["text_encoders"].append(CLIPTextModelWithProjection(_real_text_config("bigg")))
    return parts

def random_embedder(device="cpu"):
    """load_embedder's (model, tokenizer) with CLIP ViT-L/14's shapes (openai/clip-vit-large-patch14,
    train.py's default E5 model for sd15/sdxl) and random weights."""
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(text_config=_real_text_config("clip-l").to_dict(), vision_config=REAL_CLIP_VISION,
                        projection_dim=768)
    with torch.device(device):
        model = CLIPModel(config)
    return model.eval().requires_grad_(False), tiny_tokenizer(77)
