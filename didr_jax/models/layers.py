"""Parameter-creating building blocks with logical axis names (see didr_jax/sharding.py).

Every model builds its Linear/Conv/norm layers through these so that sharding annotations, dtypes
and initialisers are uniform. Parameters are float32 (``param_dtype``); ``dtype`` is the compute
dtype (e.g. bfloat16).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers
# Config names of compute / parameter / optimizer-moment dtypes: the one map every config reads.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dense(din: int, dout: int, *, rngs: nnx.Rngs, axes=("embed", "mlp"), use_bias: bool = True,
          dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(_init.lecun_normal(), axes),
      bias_init=nnx.with_partitioning(_init.zeros_init(), (axes[1],)))


def conv(cin: int, cout: int, kernel: int = 3, *, rngs: nnx.Rngs, stride: int = 1,
         padding=None, use_bias: bool = True, dtype=jnp.float32,
         param_dtype=jnp.float32) -> nnx.Conv:
  """NHWC convolution; default padding keeps torch's ``padding=kernel//2`` semantics."""
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(
      cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      rngs=rngs,
      kernel_init=nnx.with_partitioning(_init.lecun_normal(), (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(_init.zeros_init(), ("conv_out",)))


def group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32) -> nnx.GroupNorm:
  """GroupNorm over NHWC; statistics are computed in float32 with the two-pass variance.

  Flax's default fast variance (E[x^2] - E[x]^2) drifts by ~1e-2 on large-mean inputs
  (docs/models.md, "Numerics that parity depends on"); torch uses the two-pass form.
  """
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(_init.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(_init.zeros_init(), ("norm",)))


def layer_norm(features: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(_init.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(_init.zeros_init(), ("norm",)))


def embedding(num: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
              param_dtype=jnp.float32) -> nnx.Embed:
  return nnx.Embed(num, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   embedding_init=nnx.with_partitioning(_init.normal(0.02), ("vocab", "embed")))


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32, no mean and no bias (T5, Qwen3,
  diffusers' RMSNorm). transformers' T5/Qwen3 cast the normalised x back to ``dtype`` before the
  scale; diffusers multiplies in float32 first (``scale_in_float32``): parity depends on it."""

  def __init__(self, features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scale_in_float32: bool = False):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("norm",))
    self.eps, self.dtype, self.scale_in_float32 = eps, dtype, scale_in_float32

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.scale_in_float32:
      return (y * self.scale.get_value().astype(jnp.float32)).astype(self.dtype)
    return self.scale.get_value().astype(self.dtype) * y.astype(self.dtype)
