"""The reference implementations' image preprocessing, on uint8 images with PIL (not differentiable).

Each evaluation metric scores images the way its own package does, so the numbers are comparable
with published ones (training uses the differentiable float version in rewards/preprocess.py):

* ``hf_crop``: transformers' CLIPImageProcessor (PickScore; CLIPScore as torchmetrics computes it):
  PIL bicubic resize of the short side to ``size`` (long side ``int(size * long / short)``), back
  to uint8, centre crop with top-left offset ``(dim - size) // 2``;
* ``tv_crop``: torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image (OpenAI CLIP's
  transform: the LAION aesthetic predictor; BLIP's: ImageReward): the same resize, crop offset
  ``int(round((dim - size) / 2))``;
* ``longest_pad``: open_clip's ``resize_mode="longest"`` (HPSv2 / HPSv2.1): the long side to
  ``size`` (short side ``round(short * size / long)``), then centre pad with black, left/top
  ``(size - dim) // 2``;
then [0, 1] and the OpenAI CLIP mean / std. The three agree on square images.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from didr_jax.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

MODES = ("hf_crop", "tv_crop", "longest_pad")


def _resize(img: Image.Image, h: int, w: int) -> Image.Image:
  return img if img.size == (w, h) else img.resize((w, h), Image.BICUBIC)


def _short_side(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
  return _resize(img, nh, nw)


def preprocess_one(image: np.ndarray, size: int, mode: str) -> np.ndarray:
  """uint8 HWC RGB -> normalised float32 [size, size, 3]."""
  if mode not in MODES:
    raise ValueError(f"preprocessing mode {mode!r} unknown; choose one of {MODES}")
  img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  if mode == "longest_pad":
    w, h = img.size
    scale = size / max(h, w)
    img = _resize(img, round(h * scale), round(w * scale))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    img = canvas
  else:
    img = _short_side(img, size)
    w, h = img.size
    if mode == "hf_crop":
      top, left = (h - size) // 2, (w - size) // 2
    else:
      top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
  x = np.asarray(img, np.float32) / 255.0
  return ((x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32))


def preprocess(images, size: int, mode: str) -> np.ndarray:
  """A list / batch of uint8 HWC images -> [B, size, size, 3] float32."""
  return np.stack([preprocess_one(im, size, mode) for im in images])
