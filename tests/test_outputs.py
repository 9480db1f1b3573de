"""What a run leaves behind, as diffusers users expect it: a LoRA at OUT_DIR/pytorch_lora_weights.safetensors
that the stock pipeline's load_lora_weights(OUT_DIR) and lora_state_dict read (metadata any peft reads),
sample.py --lora OUT_DIR; a model card with YAML front matter, the command and the last figures;
--push_to_hub uploading exactly the result (the network is the only thing replaced)."""
import json

import pytest
from safetensors import safe_open

import sample as S
import train
from plumbing import lora, report

FAST = ["--batch_size", "2", "--num_items", "8", "--no_progress"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    train.main(["--model", "tiny-sd", "--loss", "dpo", "--lora_rank", "4", "--lora_alpha", "8", "--max_steps", "2",
                "--lr", "1e-2", "--out_dir", str(out), *FAST])
    return out


def test_lora_loads_the_diffusers_way_from_out_dir(lora_run):
    from diffusers import StableDiffusionPipeline
    import model as M
    assert (lora_run / lora.LORA_FILE).is_file()
    with safe_open(str(lora_run / lora.LORA_FILE), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    config = {k.removeprefix("unet."): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    assert set(config) == {"r", "lora_alpha", "target_modules", "init_lora_weights"}  # (any peft's LoraConfig fields)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(lora_run))
    assert set(state) == set(keys)
    m = M.load_models("tiny-sd", reference=False)
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                                   scheduler=m.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora_run))
    assert any("lora" in k for k in m.unet.state_dict()) and len(m.unet.state_dict()) > len(before)


def test_sample_py_takes_the_out_dir_as_lora(lora_run, tmp_path):
    S.main(["--model", "tiny-sd", "--lora", str(lora_run), "--prompts", "a red circle on a black background",
            "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.jsonl").is_file()


def test_model_card_has_front_matter_command_and_last_figures(lora_run):
    card = open(lora_run / "README.md").read()
    head = card.split("---\n")[1]
    assert "license: mit" in head and "library_name: diffusers" in head and "- diffusion-dpo" in head
    assert "- lora" in head and "- text-to-image" in head
    assert "python train.py --model tiny-sd --loss dpo --lora_rank 4" in card
    last = [json.loads(line) for line in open(lora_run / "metrics.jsonl")][-1]
    assert f"loss {last['loss']:.4g}" in card and f"load_lora_weights(\"{lora_run}\")" not in card  # (no hub base)


def test_front_matter_of_a_real_preset_names_base_license_and_data():
    args = train.parse_args(["--model", "sdxl", "--data", "hf:data-is-better-together/open-image-preferences-v1-binarized",
                             "--embed_model", "someone/clip"])
    head = "\n".join(report.front_matter(args, train.M.PRESETS["sdxl"], "unet"))
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in head and "license: openrail++" in head
    assert "- data-is-better-together/open-image-preferences-v1-binarized" in head and "- diffusion-rpo" in head


class FakeHub:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo, exist_ok):
        if self.fail:
            raise OSError(self.fail)
        self.calls.append(("create", repo))
        return type("Repo", (), {"repo_id": f"me/{repo}"})()

    def upload_folder(self, **kw):
        self.calls.append(("upload", kw["repo_id"], kw["folder_path"], tuple(kw["allow_patterns"])))


def test_push_to_hub_uploads_the_result_and_fails_in_one_line(lora_run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False, raising=False)
    args = train.parse_args(["--model", "tiny-sd", "--out_dir", str(lora_run), "--push_to_hub", "--hub_model_id", "rpo-x"])
    api = FakeHub()
    repo, files = report.push_to_hub(args, "lora", api)
    assert repo == "me/rpo-x" and api.calls[0] == ("create", "rpo-x") and api.calls[1][1] == "me/rpo-x"
    assert "README.md" in files and "args.json" in files and lora.LORA_FILE in files
    assert "lora/" + lora.LORA_FILE in files and not any(f.startswith("checkpoint-") for f in files)
    with pytest.raises(SystemExit) as err:
        report.push_to_hub(args, "lora", FakeHub(fail="Connection refused\nmore"))
    assert str(err.value).startswith("error: --push_to_hub rpo-x: Connection refused;") and "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):  # found before any work
        train.parse_args(["--push_to_hub"])
