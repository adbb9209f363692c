"""PyTorch reference rewards on tiny models: the differentiable tensor pipelines that reward
fine-tuning code runs in torch (ReFL / AlignProp style): [-1, 1] -> [0, 1] clamp, torch bicubic
antialiased resize, HF-style centre crop or HPSv2-style (ResizeMaxSize) centre pad, OpenAI
normalisation, then the model's own embedding functions and score formula."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tests import clip_fixtures as cf

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def _resize(x, h, w):
  if tuple(x.shape[-2:]) == (h, w):
    return x
  return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def preprocess(x, size, mode):
  """x: NCHW tensor in [-1, 1]."""
  x = ((x + 1) / 2).clamp(0, 1)
  h, w = x.shape[-2:]
  if mode == "crop":  # HF CLIPImageProcessor: shortest_edge then center_crop
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = _resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
  else:  # HPSv2 ResizeMaxSize: longest side, then pad with fill 0
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = _resize(x, nh, nw)
    ph, pw = size - nh, size - nw
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)
  return (x - MEAN) / STD


class AestheticMLP(torch.nn.Module):
  """improved-aesthetic-predictor's ``MLP`` (simple_inference.py): ``self.layers`` Sequential."""

  def __init__(self, in_dim):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

  def forward(self, x):
    return self.layers(x)


def aesthetic_mlp(in_dim):
  return AestheticMLP(in_dim).eval()


def _scores(kind, model, x, ids, *, hf, mode, head, size):
  px = preprocess(x, size, mode)
  img = model.get_image_features(pixel_values=px).pooler_output if hf else model.encode_image(px)
  img = img / img.norm(dim=-1, keepdim=True)
  if kind == "aesthetic":
    scores = head(img)[:, 0]
  else:
    ids_t = torch.from_numpy(np.asarray(ids, np.int64))
    with torch.no_grad():
      txt = model.get_text_features(input_ids=ids_t).pooler_output if hf else model.encode_text(ids_t)
    cos = (img * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    if kind == "cosine":
      scores = cos
    elif kind == "logit":
      scores = model.logit_scale.exp() * cos
    else:
      scores = 100 * cos.clamp(min=0)
  return scores


def score_and_grad(kind, model, images_nhwc, ids, *, hf, mode, head=None, size=cf.IMAGE, grad=True):
  """(scores[B], d sum(scores) / d images [NHWC] or None) from the torch model."""
  x = cf.nchw(images_nhwc).requires_grad_(grad)
  with torch.set_grad_enabled(grad):
    scores = _scores(kind, model, x, ids, hf=hf, mode=mode, head=head, size=size)
  if not grad:
    return scores.detach().numpy(), None
  scores.sum().backward()
  return scores.detach().numpy(), x.grad.numpy().transpose(0, 2, 3, 1)
