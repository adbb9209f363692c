"""Differentiable reward preprocessing: [-1, 1] NHWC images -> normalised CLIP input.

See docs/rewards.md, "Differentiable preprocessing and the official evaluation path".

The official evaluation paths go uint8 -> PIL -> resize -> crop -> normalise. Training needs the
same map as a JAX function of the pixels, so every step here is a float op inside the graph:

1. [-1, 1] -> [0, 1], then a hard clamp (its gradient is zero outside [0, 1], as in ImageReward's
   ReFL and AlignProp);
2. antialiased bicubic resize (``jax.image.resize(method="bicubic", antialias=True)``: the Keys
   a = -0.5 kernel widened by the scale factor when shrinking, which is what torch's
   ``interpolate(mode="bicubic", antialias=True)`` and PIL's BICUBIC compute);
3. short side -> size then centre crop (CLIP, PickScore, aesthetic, CLIPScore), or long side ->
   size then centre zero-pad (HPSv2); both are a plain resize for square inputs;
4. normalisation with the OpenAI CLIP mean / std.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "pad")
# Decoded generator images overshoot [-1, 1] a little; far outside it means another convention.
RANGE_LIMIT = 2.0


class ImageInputError(ValueError):
  """Images of the wrong rank, channel count, dtype or value range for a reward."""


def check_images(images, *, what: str = "images"):
  """Validate NHWC float images in [-1, 1]; the value check runs only on concrete arrays."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ImageInputError(f"{what}: expected NHWC [batch, height, width, 3], got shape {shape}")
  dtype = jnp.dtype(images.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ImageInputError(f"{what}: expected float images in [-1, 1], got dtype {dtype} "
                          "(uint8 images: x / 127.5 - 1)")
  if not isinstance(images, jax.core.Tracer):
    arr = np.asarray(images, np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(arr).all():
      raise ImageInputError(f"{what}: images contain NaN or inf")
    if lo < -RANGE_LIMIT or hi > RANGE_LIMIT:
      raise ImageInputError(f"{what}: values span [{lo:.3g}, {hi:.3g}]; expected [-1, 1] "
                            "(a [0, 255] image: x / 127.5 - 1)")


def to_unit_range(images):
  """[-1, 1] -> [0, 1] with a hard clamp."""
  return jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def resize(images, height: int, width: int):
  """Antialiased bicubic resize of NHWC float images (matches torch bicubic antialias=True)."""
  b, h, w, c = images.shape
  if (h, w) == (height, width):
    return images
  return jax.image.resize(images, (b, height, width, c), method="bicubic", antialias=True)


def resize_short_side_center_crop(images, size: int):
  """Short side -> ``size`` (long side ``int(size * long / short)``, as HF/torchvision), centre crop
  with the top-left offset ``(dim - size) // 2`` (HF CLIPImageProcessor)."""
  _, h, w, _ = images.shape
  if h <= w:
    nh, nw = size, int(size * w / h)
  else:
    nh, nw = int(size * h / w), size
  x = resize(images, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return x[:, top:top + size, left:left + size]


def resize_long_side_pad(images, size: int, fill: float = 0.0):
  """Long side -> ``size`` (short side ``round(short * size / long)``), centre pad with ``fill``
  in [0, 1] units (HPSv2's ResizeMaxSize pads the PIL image with black)."""
  _, h, w, _ = images.shape
  scale = size / max(h, w)
  nh, nw = round(h * scale), round(w * scale)
  x = resize(images, nh, nw)
  ph, pw = size - nh, size - nw
  return jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                 constant_values=fill)


def normalize(images, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def clip_preprocess(images, size: int = 224, mode: str = "crop", *, mean=OPENAI_CLIP_MEAN,
                    std=OPENAI_CLIP_STD, check: bool = True):
  """[-1, 1] NHWC images -> normalised [B, size, size, 3] float32 CLIP input, differentiably."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"preprocess mode {mode!r} unknown; choose one of {RESIZE_MODES}")
  if check:
    check_images(images)
  x = to_unit_range(images)
  x = resize_short_side_center_crop(x, size) if mode == "crop" else resize_long_side_pad(x, size)
  return normalize(x, mean, std)
