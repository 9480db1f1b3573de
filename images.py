"""
Images in, tensors out, for every source of preference pairs: decoding, one resize/crop/flip
shared by the two images of a pair (with SDXL's size and crop conditioning), and batching.
Images are float32 (3,R,R) in [-1, 1], the range the SD VAE expects.
"""
import io

import numpy as np
import torch
from PIL import Image


def image_to_tensor(img):
    """PIL image or uint8 HxWx3 array -> float32 (3,H,W) tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def tensor_to_uint8(t):
    """Inverse of image_to_tensor: (3,H,W) -> uint8 HxWx3, or (B,3,H,W) -> uint8 BxHxWx3.
    Clamps first because model samples overshoot [-1, 1] slightly."""
    t = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).numpy()



class ImagePairs(torch.utils.data.Dataset):
    """What every source of real image pairs shares: resize, one crop and one flip for both
    images of a pair, and the SDXL size/crop conditioning. Subclasses find (prompt, winner,
    loser) and call self.pair_item."""

    def __init__(self, resolution=512, seed=0, random_crop=False, random_flip=False):
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.random_flip = random_crop, random_flip
        # Crop/flip randomness is keyed on the epoch, so each epoch sees new crops. The training
        # loop sets it; DataLoader workers copy the dataset at each iter() (unless
        # persistent_workers=True), so set it before iterating over the epoch.
        self.epoch = 0
        self.skip_counts = {}  # reason -> count, for pairs dropped before training sees them

    def pair_item(self, prompt, win, los, i):
        """Two PIL images (decoded) -> the training item: both resized so the shorter side of
        the winner is `resolution`, cropped by one window, flipped by one decision."""
        R = self.resolution
        # Resize so the shorter side is exactly R. The loser goes to the winner's resized size
        # even if its own aspect differs, so one crop window fits both.
        w0, h0 = win.size
        scale = R / min(w0, h0)
        size = (R, max(R, round(h0 * scale))) if w0 <= h0 else (max(R, round(w0 * scale)), R)
        original_w, original_l = (h0, w0), (los.size[1], los.size[0])
        win = win if win.size == size else win.resize(size, Image.BICUBIC)
        los = los if los.size == size else los.resize(size, Image.BICUBIC)
        # One crop corner and one flip decision for BOTH images: a pair cropped differently
        # would differ in content as well as in quality, and the loss would learn the crop.
        # Draw all three numbers always, so the flip decision doesn't depend on random_crop.
        rng = np.random.default_rng([self.seed, self.epoch, i])
        W, H = size
        top, left, flip = rng.integers(0, H - R + 1), rng.integers(0, W - R + 1), rng.random() < 0.5
        if not self.random_crop:
            top, left = (H - R) // 2, (W - R) // 2  # centre (floor: biased to top-left by <1 px)
        box = (int(left), int(top), int(left) + R, int(top) + R)
        out = []
        for im in (win, los):
            im = im.crop(box)
            if self.random_flip and flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(image_to_tensor(im))
        # crop_top_left is the crop window in the resized, unflipped image (SDXL add_time_ids);
        # the original sizes are (height, width) before any resize, as SDXL conditions on them.
        return {"prompt": prompt, "winner": out[0], "loser": out[1], "original_size_w": original_w,
                "original_size_l": original_l, "crop_top_left": (int(top), int(left)), "index": i}


def decode_image(source):
    """A path or JPEG/PNG bytes -> RGB PIL image, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")  # convert() forces the full decode here
    except (OSError, ValueError, Image.DecompressionBombError):
        return None



def collate_pairs(items):
    """Stack item dicts into a batch; drop skip markers and report them in "skipped".
    Fields an item kind lacks (loser, original_size_l for ToyImages) come out as None."""
    kept = [it for it in items if "skip" not in it]
    skipped = [it["skip"] for it in items if "skip" in it]
    batch = dict.fromkeys(("winner", "loser", "original_size_w", "original_size_l",
                           "crop_top_left", "index"))  # all None until filled below
    batch.update(prompt=[it["prompt"] for it in kept], skipped=skipped)
    if not kept:  # the training loop checks batch["winner"] is None and moves on
        return batch
    if "winner" in kept[0]:  # (CachedPairs items carry cache_* tensors instead of images)
        batch["winner"] = torch.stack([it["winner"] for it in kept])
    if "loser" in kept[0]:
        batch["loser"] = torch.stack([it["loser"] for it in kept])
    for key in ("original_size_w", "original_size_l", "crop_top_left"):
        if key in kept[0]:
            batch[key] = torch.tensor([it[key] for it in kept], dtype=torch.long)
    batch["index"] = torch.tensor([it["index"] for it in kept], dtype=torch.long)
    for key in kept[0]:
        if key.startswith("cache_"):  # CachedPairs: latents, text states, E5 features
            batch[key] = torch.stack([it[key] for it in kept])
    if "styled" in kept[0]:
        batch["styled"] = torch.tensor([it["styled"] for it in kept], dtype=torch.bool)
    return batch
