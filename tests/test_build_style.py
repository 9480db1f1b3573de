"""python -m tools.build_style: Style Alignment pairs from source images, with InstructPix2Pix
(a tiny random pipeline built here and saved, loaded by path like the real one) or offline."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from tools import build_style
from plumbing import tiny
from plumbing.images import apply_style


def sources(folder, n=5):
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(n):
            for side in ("w", "l"):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}{side}.png")
            f.write(json.dumps({"prompt": f"prompt {i}", "winner": f"{i}w.png", "loser": f"{i}l.png"}) + "\n")
    return folder / "pairs.jsonl"


def tiny_instruct_pix2pix(path):
    """StableDiffusionInstructPix2PixPipeline with random tiny weights: its UNet takes 8 channels
    (the noisy latents and the source image's latents), as the real one does."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel
    torch.manual_seed(0)
    tokenizer = tiny.tiny_tokenizer(max_length=32)
    config = dict(tiny.tiny_unet_config(xl=False, vae=True), in_channels=8)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text_encoder=CLIPTextModel(tiny.tiny_text_config(len(tokenizer), 32)), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**config), scheduler=EulerAncestralDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def test_build_style_with_instruct_pix2pix_is_resumable(tmp_path):
    src = sources(tmp_path / "src")
    tiny_instruct_pix2pix(tmp_path / "ip2p")
    out = tmp_path / "out"
    args = dict(editor=str(tmp_path / "ip2p"), resolution=32, steps=2, batch_size=2, progress=False)
    assert build_style.build_style("vangogh", str(src), str(out), limit=3, **args) == 3
    lines = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert [rec["source"] for rec in lines] == [0, 1, 2] and [rec["prompt"] for rec in lines] == [f"prompt {i}" for i in range(3)]
    for rec in lines:  # winner = the edit, loser = the source (its winner image, centre-cropped)
        edit, source = Image.open(out / rec["winner"]), Image.open(out / rec["loser"])
        assert edit.size == source.size == (32, 32)
        assert not np.array_equal(np.asarray(edit), np.asarray(source))
    original = Image.open(tmp_path / "src" / "1w.png")
    assert np.array_equal(np.asarray(Image.open(out / lines[1]["loser"])), np.asarray(build_style.square_crop(original, 32)))
    assert build_style.build_style("vangogh", str(src), str(out), limit=3, **args) == 0  # rerun: nothing new
    assert build_style.build_style("vangogh", str(src), str(out), **args) == 2  # the rest, once
    assert [json.loads(line)["source"] for line in open(out / "pairs.jsonl")] == [0, 1, 2, 3, 4]
    assert len(data.ManifestPairs(out / "pairs.jsonl", 32)) == 5  # trains as a manifest


def test_build_style_offline_toy_styles_and_errors(tmp_path):
    src = sources(tmp_path / "src", n=2)
    assert build_style.build_style("toy-sketch", str(src), str(tmp_path / "o"), resolution=16, progress=False) == 2
    rec = json.loads(open(tmp_path / "o" / "pairs.jsonl").readline())
    source = np.asarray(Image.open(tmp_path / "o" / rec["loser"]))
    expect = apply_style(source, "sketch", np.random.default_rng([0, 0]))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / rec["winner"])), expect)
    with pytest.raises(SystemExit) as e:
        build_style.build_style("winter", str(src), str(tmp_path / "o2"), editor=str(tmp_path / "missing"), progress=False)
    assert "--editor /path/to/folder" in str(e.value) and "--style toy-winter" in str(e.value)
    with pytest.raises(SystemExit) as e:
        build_style.main(["--style", "toy-winter", "--src", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o3")])
    assert str(e.value).startswith("error: --src") and "not found" in str(e.value)
    # its --out keeps train.py's rule: its own output is continued, a folder of other files refused
    with pytest.raises(SystemExit) as e:
        build_style.main(["--style", "toy-winter", "--src", str(src), "--out", str(tmp_path)])
    assert "holds files that are not this program's output" in str(e.value)


def test_build_style_from_pickapic_shards_uses_the_preferred_images(tmp_path):
    pytest.importorskip("pyarrow")
    from test_pickapic import close, write_shards
    expected = write_shards(tmp_path / "pp")
    assert build_style.build_style("toy-winter", str(tmp_path / "pp"), str(tmp_path / "o"), resolution=16, progress=False) == 6
    for line in open(tmp_path / "o" / "pairs.jsonl"):  # the corrupt pair ("c") is skipped
        rec = json.loads(line)
        source = np.asarray(Image.open(tmp_path / "o" / rec["loser"]), dtype=float).mean(axis=(0, 1))
        assert close(source, expected[rec["prompt"]][0])  # the loser here is Pick-a-Pic's *preferred* image
