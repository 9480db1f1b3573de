"""evaluate.py's metrics that need optional packages: hps (open_clip, requirements-eval.txt) and
imagereward (the ImageReward package). Neither is in requirements.txt, so:

  - HPSv2's preprocessing (rewards.hps_pixels) is checked on hand-made images against values
    worked out by hand, and against torchvision's resize and pad where torchvision imports;
  - the whole hps path (checkpoint file -> model -> scores -> results.json) runs against a
    stand-in open_clip module everywhere, and against the real open_clip with a tiny random
    ViT where open_clip imports, checked against the model's own forward on pixels made by
    torchvision;
  - every way an optional package can be missing or broken (not installed, ImportError inside it,
    FileNotFoundError or RuntimeError at import) ends in one line, never a traceback;
  - checkpoints are read with weights_only=True: a pickle holding an object is refused, in one
    line naming tools.to_safetensors, which converts it only with --trust_pickle.
"""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
from plumbing import images, rewards
from tests.test_rewards import PROMPTS, random_images, write_folder
from tools import to_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = np.array(images.CLIP_MEAN, dtype=np.float32), np.array(images.CLIP_STD, dtype=np.float32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(tmp_path, *argv):
    """evaluate.main on the arguments -> the message it stops with (asserted to be one line)."""
    with pytest.raises(SystemExit) as err:
        E.main(list(argv))
    msg = str(err.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def one_image_folder(tmp_path):
    return write_folder(tmp_path / "imgs", [(PROMPTS[0], 0)], random_images(1, 0))


# ----------------------------------------------------------------------------------------------
# HPSv2's preprocessing


def normalised(rgb01):
    return (np.asarray(rgb01, dtype=np.float32) - MEAN) / STD


def test_hps_pixels_by_hand():
    # 8 wide, 4 high, one colour: the longer side goes to 4, so 4x2 of that colour, then one black
    # row above and one below (antialiased bicubic keeps a flat colour flat: its weights sum to 1)
    colour = np.array([200, 100, 50]) / 255
    x = rewards.hps_pixels(Image.new("RGB", (8, 4), (200, 100, 50)), 4).numpy()
    assert x.shape == (3, 4, 4)
    for row in range(4):
        want = normalised(colour) if row in (1, 2) else normalised([0, 0, 0])
        assert np.allclose(x[:, row, :], want[:, None], atol=1e-5), row
    # 4 wide, 12 high: the width becomes round(4·4/12) = 1 column, padded 1 left and 2 right
    x = rewards.hps_pixels(Image.new("RGB", (4, 12), (10, 20, 30)), 4).numpy()
    for col in range(4):
        want = normalised(np.array([10, 20, 30]) / 255) if col == 1 else normalised([0, 0, 0])
        assert np.allclose(x[:, :, col], want[:, None], atol=1e-5), col
    # already 4x4: no resize at all, every pixel is its own value normalised (a checkerboard survives)
    board = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)
    x = rewards.hps_pixels(Image.fromarray(np.stack([board] * 3, -1)), 4).numpy()
    assert np.allclose(x, normalised(np.stack([board] * 3, -1) / 255).transpose(2, 0, 1), atol=1e-6)
    # grey and palette images come out RGB
    assert rewards.hps_pixels(Image.new("L", (6, 6), 128), 4).shape == (3, 4, 4)


def torchvision_pixels(im, size):
    """HPSv2's transform written with torchvision (what hpsv2/src/open_clip/transform.py composes):
    ToTensor, resize the longer side (bicubic, antialias), pad black, Normalize."""
    import torchvision.transforms.functional as TF
    x = TF.to_tensor(im.convert("RGB"))
    h, w = x.shape[1:]
    scale = size / max(h, w)
    if scale != 1.0:
        h, w = round(h * scale), round(w * scale)
        x = TF.resize(x, [h, w], TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.pad(x, [(size - w) // 2, (size - h) // 2, size - w - (size - w) // 2, size - h - (size - h) // 2], fill=0)
    return TF.normalize(x, images.CLIP_MEAN, images.CLIP_STD)


def importable(name):
    """The module, or a skip: absent or broken alike (a torchvision built for another torch raises
    RuntimeError at import, which pytest.importorskip would not catch)."""
    try:
        return __import__(name, fromlist=["_"])
    except Exception as err:
        pytest.skip(f"{name} does not import here ({type(err).__name__})")


def test_hps_pixels_equal_torchvision():
    importable("torchvision.transforms.functional")
    rng = np.random.default_rng(0)
    for h, w in ((48, 30), (20, 64), (32, 32), (33, 7)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.allclose(rewards.hps_pixels(im, 32), torchvision_pixels(im, 32), atol=1e-5), (h, w)


# ----------------------------------------------------------------------------------------------
# The hps path against a stand-in open_clip module (everywhere)


class FakeClip(torch.nn.Module):
    """What evaluate.py uses of an open_clip CLIP: visual.image_size, encode_image and encode_text
    with normalize=True."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(3, 4), torch.nn.Embedding(128, 4)
        self.visual = types.SimpleNamespace(image_size=(6, 6))

    def encode_image(self, images, normalize=False):
        assert images.shape[1:] == (3, 6, 6) and normalize
        return torch.nn.functional.normalize(self.img(images.mean(dim=(2, 3))), dim=-1)

    def encode_text(self, tokens, normalize=False):
        assert normalize
        return torch.nn.functional.normalize(self.txt(tokens).mean(1), dim=-1)


def fake_tokenizer(texts):  # 8 character codes per text
    return torch.tensor([[ord(c) % 128 for c in (t + " " * 8)[:8]] for t in texts])


def fake_open_clip(monkeypatch, created):
    oc = types.ModuleType("open_clip")

    def create_model(name, pretrained=None, precision="fp32", device="cpu"):
        assert name == rewards.HPS_ARCH == "ViT-H-14" and pretrained is None  # every tensor from the checkpoint
        created.append(FakeClip())
        return created[-1]
    oc.create_model = create_model
    oc.get_tokenizer = lambda name: fake_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", oc)


def expected_hps(model, paths, prompts, size):
    with torch.no_grad():
        img = model.encode_image(torch.stack([rewards.hps_pixels(Image.open(p), size) for p in paths]), normalize=True)
        txt = model.encode_text(fake_tokenizer(prompts), normalize=True)
    return (100 * (img * txt).sum(-1)).tolist()


def test_hps_path_with_a_stand_in_open_clip(tmp_path, monkeypatch):
    created = []
    fake_open_clip(monkeypatch, created)
    torch.manual_seed(0)
    trained = FakeClip()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"  # as HPSv2 saves it: a training checkpoint dict
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 1,
                "name": "HPSv2"}, ckpt)
    st = tmp_path / "HPS_v2.1.safetensors"
    assert to_safetensors.convert(str(ckpt), str(st)) == (3, 0)  # img.weight, img.bias, txt.weight
    keys = [(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0)]
    folder = write_folder(tmp_path / "imgs", keys, random_images(3, 0))
    paths = [os.path.join(folder, f"{i:04d}_seed{s}.png") for i, (_, s) in enumerate(keys)]
    want = expected_hps(trained, paths, [p for p, _ in keys], 6)
    for path in (ckpt, st):
        out = tmp_path / f"{path.suffix[1:]}.json"
        E.main(["--images", folder, "--metrics", "hps", "--hps_checkpoint", str(path), "--batch_size", "2",
                "--out", str(out)])
        # the weights loaded are the checkpoint's (the "module." prefix of a DDP save dropped)
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in created[-1].state_dict().items())
        res = json.load(open(out))
        assert res["runs"][0]["scores"]["hps"] == pytest.approx(want, abs=1e-4)
    assert min(want) < max(want) and all(-100 <= w <= 100 for w in want)  # 100·cos: in [-100, 100], not constant


def test_hps_checkpoints_that_are_refused(tmp_path, monkeypatch):
    fake_open_clip(monkeypatch, [])
    folder = one_image_folder(tmp_path)
    hps = ["--images", folder, "--out", str(tmp_path / "r.json"), "--metrics", "hps", "--hps_checkpoint"]
    # a pickle holding an object: weights_only=True refuses to build it; the line names the conversion
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": FakeClip().state_dict(), "args": types.SimpleNamespace(lr=1)}, evil)
    msg = run(tmp_path, *hps, str(evil))
    assert "holds more than tensors (UnpicklingError" in msg and "weights_only=True" in msg
    assert f"python -m tools.to_safetensors {evil} OUT.safetensors --trust_pickle" in msg
    assert "then pass --hps_checkpoint OUT.safetensors" in msg
    assert "no such file" in run(tmp_path, *hps, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot load the HPSv2 v2.1 checkpoint" in run(tmp_path, *hps, str(tmp_path / "junk.pt"))
    torch.save({"state_dict": {"other.weight": torch.zeros(2)}}, tmp_path / "other.pt")  # not HPSv2's keys
    msg = run(tmp_path, *hps, str(tmp_path / "other.pt"))
    assert "into open_clip's ViT-H-14" in msg and "pass --hps_checkpoint" in msg
    # no checkpoint given, HF_HUB_OFFLINE set and nothing cached: one line, nothing downloaded
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    msg = run(tmp_path, "--images", folder, "--out", str(tmp_path / "r.json"), "--metrics", "hps")
    assert msg.startswith("error: cannot load HPSv2 v2.1 from the hub repo xswu/HPSv2") and "--hps_checkpoint" in msg


def test_to_safetensors_converts_a_pickle_only_when_trusted(tmp_path):
    state = {"a.weight": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2])}
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "args": types.SimpleNamespace(lr=1)}, evil)
    with pytest.raises(SystemExit, match="holds more than tensors .*--trust_pickle"):
        to_safetensors.main([str(evil), str(tmp_path / "out.safetensors")])
    assert not (tmp_path / "out.safetensors").exists()
    to_safetensors.main([str(evil), str(tmp_path / "out.safetensors"), "--trust_pickle"])
    from safetensors.torch import load_file
    back = load_file(str(tmp_path / "out.safetensors"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # a view is written as its own tensor (safetensors stores no shared storage); --key '' keeps the top level
    base = torch.arange(10.0)
    torch.save({"x": base[2:5], "y": base, "step": 3}, tmp_path / "views.pt")
    assert to_safetensors.convert(str(tmp_path / "views.pt"), str(tmp_path / "v.safetensors"), key="") == (2, 1)
    assert load_file(str(tmp_path / "v.safetensors"))["x"].tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(SystemExit, match="must end in .safetensors"):
        to_safetensors.main([str(evil), str(tmp_path / "out.pt")])


# ----------------------------------------------------------------------------------------------
# The hps path with the real open_clip and a tiny random ViT (where open_clip imports)

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def test_hps_with_open_clip_and_tiny_random_weights(tmp_path, monkeypatch):
    open_clip = importable("open_clip")
    (tmp_path / "tiny-hps-test.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(tmp_path / "tiny-hps-test.json"))
    monkeypatch.setattr(rewards, "HPS_ARCH", "tiny-hps-test")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-hps-test", pretrained=None).eval()
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "HPS_v2_compressed.pt")
    keys = [(p, 0) for p in PROMPTS] + [(PROMPTS[0], 1)]
    folder = write_folder(tmp_path / "imgs", keys, random_images(4, 1))  # 20x28: resized and padded
    out = tmp_path / "r.json"
    E.main(["--images", folder, "--metrics", "hps", "--hps_version", "v2.0", "--hps_checkpoint",
            str(tmp_path / "HPS_v2_compressed.pt"), "--batch_size", "3", "--out", str(out)])
    got = json.load(open(out))["runs"][0]["scores"]["hps"]
    # independently: torchvision's pixels, open_clip's tokenizer, the model's forward (unit-length
    # features), and the diagonal of image_features @ text_features.T times 100, as HPSv2's benchmark
    images = [Image.open(os.path.join(folder, f"{i:04d}_seed{s}.png")) for i, (_, s) in enumerate(keys)]
    with torch.no_grad():
        img, txt, _ = model(torch.stack([torchvision_pixels(im, 32) for im in images]),
                            open_clip.get_tokenizer("tiny-hps-test")([p for p, _ in keys]))[:3]
    want = (100 * torch.diagonal(img @ txt.T)).tolist()
    assert got == pytest.approx(want, abs=1e-3) and np.ptp(want) > 1e-3


# ----------------------------------------------------------------------------------------------
# ImageReward through its package (a stand-in: the real one downloads gigabytes)


def fake_imagereward(monkeypatch, calls):
    ir = types.ModuleType("ImageReward")

    class Reward:  # ImageReward.score: a list for a list of images, a float for a single one
        def score(self, prompt, images):
            r = [len(prompt) + np.asarray(im, dtype=np.float64).mean() / 255 for im in images]
            return r if len(r) > 1 else r[0]

    def load(name, device="cpu", download_root=None, med_config=None):
        from huggingface_hub import constants
        calls.append(dict(name=name, med_config=med_config, hub_offline=constants.HF_HUB_OFFLINE))
        return Reward()
    ir.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", ir)


def test_imagereward_scores_per_prompt(tmp_path, monkeypatch):
    calls = []
    fake_imagereward(monkeypatch, calls)
    keys = [(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0)]
    folder = write_folder(tmp_path / "imgs", keys, random_images(3, 0))
    E.main(["--images", folder, "--metrics", "imagereward", "--out", str(tmp_path / "r.json")])
    assert calls == [dict(name="ImageReward-v1.0", med_config=None, hub_offline=calls[0]["hub_offline"])]
    images = [Image.open(os.path.join(folder, f"{i:04d}_seed{s}.png")).convert("RGB") for i, (_, s) in enumerate(keys)]
    # prompts grouped, one prompt's images in one call; a lone image's float answer too
    want = [len(p) + np.asarray(im, dtype=np.float64).mean() / 255 for (p, _), im in zip(keys, images)]
    assert json.load(open(tmp_path / "r.json"))["runs"][0]["scores"]["imagereward"] == pytest.approx(want, abs=1e-4)


def test_imagereward_downloads_nothing_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    calls = []
    fake_imagereward(monkeypatch, calls)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after the hub library read it: only our check sees it
    folder = one_image_folder(tmp_path)
    base = ["--images", folder, "--out", str(tmp_path / "r.json"), "--metrics", "imagereward"]
    msg = run(tmp_path, *base)  # the default name would be a download
    assert "HF_HUB_OFFLINE set (it is not a local file" in msg and "--imagereward_model" in msg and calls == []
    ckpt = tmp_path / "ir" / "ImageReward.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    msg = run(tmp_path, *base, "--imagereward_model", str(ckpt))  # the package would download med_config.json
    assert f"{tmp_path / 'ir' / 'med_config.json'} is missing" in msg and calls == []
    (tmp_path / "ir" / "med_config.json").write_text("{}")
    before = constants.HF_HUB_OFFLINE
    E.main([*base, "--imagereward_model", str(ckpt)])
    # the package got the local config, and the hub library was offline while it built its model
    assert calls == [dict(name=str(ckpt), med_config=str(tmp_path / "ir" / "med_config.json"), hub_offline=True)]
    assert constants.HF_HUB_OFFLINE == before  # and only then


# ----------------------------------------------------------------------------------------------
# Missing or broken optional packages: one line, never a traceback


def broken_module(tmp_path, monkeypatch, module, body):
    """`module` importable from tmp_path, failing at import with `body`."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(body)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    return folder


BROKEN = [  # (metric, module, what the module does at import, what the line must say)
    ("hps", "open_clip", None,
     "needs the open_clip package, which is not installed; pip install -r requirements-eval.txt"),
    ("hps", "open_clip", "raise RuntimeError('operator torchvision::nms does not exist')",
     "needs the open_clip package, which fails to import (RuntimeError: operator torchvision::nms does not exist)"),
    ("hps", "open_clip", "open('/nonexistent/bpe_simple_vocab_16e6.txt.gz')",
     "which fails to import (FileNotFoundError: [Errno 2] No such file or directory"),
    ("hps", "open_clip", "import a_module_that_is_not_there",
     "which fails to import (ModuleNotFoundError: No module named 'a_module_that_is_not_there')"),
    ("imagereward", "ImageReward", None, "needs the ImageReward package, which is not installed; image-reward 1.5"),
    ("imagereward", "ImageReward",
     "raise ImportError(\"cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'\", "
     "name='transformers.modeling_utils')",
     "which fails to import (ImportError: cannot import name 'apply_chunking_to_forward' from "
     "'transformers.modeling_utils'); image-reward 1.5 imports only with transformers<4.56"),
    ("imagereward", "ImageReward", "1 / 0", "which fails to import (ZeroDivisionError: division by zero)"),
]


@pytest.mark.parametrize("metric,module,body,needle", BROKEN)
def test_missing_or_broken_package_is_one_line(tmp_path, monkeypatch, metric, module, body, needle):
    if body is None:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    else:
        broken_module(tmp_path, monkeypatch, module, body)
    # checked before any model is loaded: the CLIP here does not exist and is never reached
    msg = run(tmp_path, "--images", one_image_folder(tmp_path), "--out", str(tmp_path / "r.json"),
              "--metrics", f"clip,{metric}", "--clip_model", str(tmp_path / "no_clip"))
    assert msg.startswith(f"error: --metrics {metric} needs the {module} package") and needle in msg


def test_broken_package_from_the_command_line_prints_one_line(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "open_clip.py").write_text("raise FileNotFoundError(2, 'No such file or directory', 'vocab.txt.gz')\n")
    folder = one_image_folder(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--images", folder, "--metrics", "hps",
                        "--out", str(tmp_path / "r.json")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: --metrics hps needs the open_clip package, which fails "
                                                        "to import (FileNotFoundError:")
