"""Flax NNX port of pytorch-fid's FID InceptionV3 (``pytorch_fid.inception.InceptionV3``), NHWC.

Only the configuration FID uses: ``output_blocks=[3]`` (2048-d pool3 features),
``resize_input=True``, ``normalize_input=True``, ``use_fid_inception=True``. That network is
torchvision's Inception v3 with the TF-graph patches of ``fid_inception_v3()``: the A/C/E_1 pool
branches average with ``count_include_pad=False`` and the last block (E_2) max-pools. Attribute
names follow the torch modules so the mapping table (``inception_mapping.py``) is one-to-one.
BatchNorm always runs on the stored statistics (eval mode, eps 1e-3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_init = nnx.initializers
FID_SIZE = 299
BN_EPS = 1e-3


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """torchvision ``BasicConv2d``: bias-free conv -> BatchNorm(eps 1e-3, eval) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0,
               rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(
        cin, cout, kernel_size=_pair(kernel), strides=(stride, stride),
        padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs,
        kernel_init=nnx.with_partitioning(_init.lecun_normal(), (None, None, "conv_in", "conv_out")))
    self.bn = nnx.BatchNorm(
        cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs,
        scale_init=nnx.with_partitioning(_init.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(_init.zeros_init(), ("norm",)))

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, size: int, stride: int, padding: int = 0):
  """torch ``max_pool2d`` (padding counts as -inf)."""
  p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1),
                               (1, stride, stride, 1), p)


def avg_pool_exclude_pad(x):
  """``avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False)``: TF's average pool,
  which divides by the number of in-image pixels only (the FID patch)."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  return total / count


class InceptionA(nnx.Module):
  """``FIDInceptionA``: [1x1, 5x5, double 3x3, pool] concatenated in that order."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """torchvision ``InceptionB`` (Mixed_6a, grid reduction): [3x3/2, double 3x3/2, maxpool/2]."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """``FIDInceptionC``: [1x1, 7x7 (1x7, 7x1), double 7x7, pool], factorised 7x7 convolutions."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = conv(d)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, bp], axis=-1)


class InceptionD(nnx.Module):
  """torchvision ``InceptionD`` (Mixed_7a, grid reduction): [3x3/2, 7x7x3/2, maxpool/2]."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """``FIDInceptionE_1`` (``pool="avg"``, count_include_pad=False) or ``FIDInceptionE_2``
  (``pool="max"``): [1x1, (1x3, 3x1), double (1x3, 3x1), pool]."""

  def __init__(self, cin: int, *, pool: str, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"InceptionE pool {pool!r}: 'avg' or 'max'")
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
    return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


def _bilinear_taps(in_size: int, out_size: int):
  """Indices and weights of torch's ``upsample_bilinear2d`` (align_corners=False, no antialias):
  src = max(scale * (dst + 0.5) - 0.5, 0) in float32 with a float32 ``scale = in / out``.

  torch's CPU kernel evaluates src as one fused multiply-add; rounding the product and the
  subtraction separately moves src by an ulp (7.6e-6 near 100), so the FMA is reproduced: the
  float64 expression is exact here and rounds once to float32.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float64)
  src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = src.astype(np.int64)
  lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0, i1, np.float32(1) - lam1, lam1


def resize_bilinear_torch(x, size: int = FID_SIZE):
  """``F.interpolate(x, (size, size), mode="bilinear", align_corners=False)`` on NHWC.

  ``jax.image.resize`` antialiases when downsampling (torch does not here), so the two-tap
  formula is written out: width first, then height, as torch's separable kernel does.
  """
  _, h, w, _ = x.shape
  i0, i1, l0, l1 = _bilinear_taps(w, size)
  x = x[:, :, i0] * l0[None, None, :, None] + x[:, :, i1] * l1[None, None, :, None]
  i0, i1, l0, l1 = _bilinear_taps(h, size)
  return x[:, i0] * l0[None, :, None, None] + x[:, i1] * l1[None, :, None, None]


class InceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 up to pool3: images [B, H, W, 3] in [0, 1] -> [B, 2048]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)

  def __call__(self, images):
    x = resize_bilinear_torch(jnp.asarray(images, jnp.float32), FID_SIZE)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))
