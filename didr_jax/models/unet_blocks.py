"""Building blocks shared by the UNet and the VAE, mirroring diffusers' modules (NHWC).

Attribute names equal the diffusers ones (``resnets``, ``attentions``, ``to_out.0``...) so that the
mapping tables in ``unet_mapping.py`` / ``vae_mapping.py`` are mostly identity renames. Norm
epsilons and activations follow docs/models.md ("Numerics that parity depends on"): GroupNorm
statistics in float32, exact-erf GELU in GEGLU, diffusers' sinusoidal timestep embedding.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models import layers
from didr_jax.models.attention import check_attention_impl, dot_product_attention
from didr_jax.models.remat import REMAT_POLICIES, maybe_remat


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """diffusers ``get_timestep_embedding``: [N] -> [N, dim] float32 (sin first unless flipped)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def nearest_resize(x, size):
  """torch ``F.interpolate(mode="nearest")`` on NHWC: src = floor(dst * in / out)."""
  _, h, w, _ = x.shape
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)), h - 1)
  cols = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)), w - 1)
  return jnp.take(jnp.take(x, rows.astype(np.int32), axis=1), cols.astype(np.int32), axis=2)


def call_block(block: nnx.Module, remat: str, *args, **static):
  """Run ``block(*args, **static)``, rematerialised with the named policy.

  The block's state is passed as an explicit argument of the checkpointed function (split/merge
  inside), which works in NNX graph and tree mode alike. ``static`` kwargs (e.g. output sizes)
  are closed over, so they stay Python values.
  """
  args = jax.tree.map(shd.constrain_batch, args)   # batch-sharded in and out (sharding.constrain_batch)
  if remat == "none":
    return jax.tree.map(shd.constrain_batch, block(*args, **static))
  graphdef, state = nnx.split(block)
  fn = maybe_remat(lambda st, *a: nnx.merge(graphdef, st)(*a, **static), remat)
  return jax.tree.map(shd.constrain_batch, fn(state, *args))


class _Opts:
  """Constructor options shared by every block: dtypes and the attention implementation."""

  def __init__(self, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "xla"):
    self.dtype, self.param_dtype, self.attention = dtype, param_dtype, attention

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def model_options(config, *, dtype, param_dtype, attention: str, remat: str) -> _Opts:
  """Validate a model's config and its attention / remat enums before building anything."""
  config.validate()
  check_attention_impl(attention)
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} unknown; choose one of {REMAT_POLICIES}")
  return _Opts(dtype, param_dtype, attention)


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2, with diffusers' optional ``cond_proj`` (LCM guidance input)."""

  def __init__(self, din: int, dout: int, *, cond_proj_dim: Optional[int], opts: _Opts,
               rngs: nnx.Rngs):
    self.linear_1 = layers.dense(din, dout, rngs=rngs, **opts.kw)
    self.linear_2 = layers.dense(dout, dout, rngs=rngs, **opts.kw)
    self.cond_proj = (layers.dense(cond_proj_dim, din, use_bias=False, rngs=rngs, **opts.kw)
                      if cond_proj_dim else None)

  def __call__(self, x, condition=None):
    if condition is not None:
      if self.cond_proj is None:
        raise ValueError("timestep_cond given but the config has no time_cond_proj_dim")
      x = x + self.cond_proj(condition)
    elif self.cond_proj is not None:
      raise ValueError("config.time_cond_proj_dim is set: pass timestep_cond")
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """GN -> SiLU -> conv1 (+ time proj) -> GN -> SiLU -> conv2, plus (1x1 conv) shortcut."""

  def __init__(self, cin: int, cout: int, *, temb_channels: Optional[int], groups: int,
               eps: float, output_scale_factor: float = 1.0, opts: _Opts, rngs: nnx.Rngs):
    self.norm1 = layers.group_norm(cin, groups, eps, rngs=rngs, **opts.kw)
    self.conv1 = layers.conv(cin, cout, 3, rngs=rngs, **opts.kw)
    self.time_emb_proj = (layers.dense(temb_channels, cout, rngs=rngs, **opts.kw)
                          if temb_channels else None)
    self.norm2 = layers.group_norm(cout, groups, eps, rngs=rngs, **opts.kw)
    self.conv2 = layers.conv(cout, cout, 3, rngs=rngs, **opts.kw)
    self.conv_shortcut = layers.conv(cin, cout, 1, rngs=rngs, **opts.kw) if cin != cout else None
    self.output_scale_factor = float(output_scale_factor)

  def __call__(self, x, temb=None):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    out = shortcut + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
  """3x3 stride-2 conv; ``padding=0`` means diffusers' explicit (0, 1, 0, 1) pad (VAE)."""

  def __init__(self, channels: int, *, padding: int, opts: _Opts, rngs: nnx.Rngs):
    self.padding = int(padding)
    self.conv = layers.conv(channels, channels, 3, stride=2, padding=self.padding, rngs=rngs,
                            **opts.kw)

  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest x2 (or to an explicit size), then a 3x3 conv."""

  def __init__(self, channels: int, *, opts: _Opts, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, rngs=rngs, **opts.kw)

  def __call__(self, x, size=None):
    size = size or (2 * x.shape[1], 2 * x.shape[2])
    return self.conv(nearest_resize(x, size))


class Attention(nnx.Module):
  """diffusers ``Attention`` subset: q/k/v projections, multi-head SDPA, ``to_out.0``.

  With ``group_norm_groups`` it is the VAE mid-block spatial attention (GroupNorm first, residual
  added, input NHWC); otherwise it maps [B, T, C] tokens (optionally attending to ``context``).
  """

  def __init__(self, query_dim: int, *, heads: int, head_dim: int,
               cross_attention_dim: Optional[int] = None, bias: bool = False,
               group_norm_groups: Optional[int] = None, eps: float = 1e-6, opts: _Opts,
               rngs: nnx.Rngs):
    inner = heads * head_dim
    kv_dim = cross_attention_dim or query_dim
    self.heads, self.head_dim, self.attention = heads, head_dim, opts.attention
    self.group_norm = (layers.group_norm(query_dim, group_norm_groups, eps, rngs=rngs, **opts.kw)
                       if group_norm_groups else None)
    self.to_q = layers.dense(query_dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_k = layers.dense(kv_dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_v = layers.dense(kv_dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_out = nnx.List([layers.dense(inner, query_dim, axes=("mlp", "embed"), rngs=rngs,
                                         **opts.kw)])

  def _attend(self, x, context):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    o = dot_product_attention(q, k, v, implementation=self.attention)
    return self.to_out[0](o.reshape(b, t, self.heads * self.head_dim))

  def __call__(self, x, context=None):
    if self.group_norm is None:
      return self._attend(x, x if context is None else context)
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    return self._attend(tokens, tokens).reshape(b, h, w, c) + x


class FeedForward(nnx.Module):
  """GEGLU feed-forward (diffusers ``ff.net.0.proj`` -> ``proj``, ``ff.net.2`` -> ``out``)."""

  def __init__(self, dim: int, *, mult: int = 4, opts: _Opts, rngs: nnx.Rngs):
    inner = dim * mult
    self.proj = layers.dense(dim, 2 * inner, rngs=rngs, **opts.kw)
    self.out = layers.dense(inner, dim, axes=("mlp", "embed"), rngs=rngs, **opts.kw)

  def __call__(self, x):
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return self.out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

  def __init__(self, dim: int, *, heads: int, head_dim: int, cross_attention_dim: int,
               opts: _Opts, rngs: nnx.Rngs):
    self.norm1 = layers.layer_norm(dim, 1e-5, rngs=rngs, **opts.kw)
    self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, opts=opts, rngs=rngs)
    self.norm2 = layers.layer_norm(dim, 1e-5, rngs=rngs, **opts.kw)
    self.attn2 = Attention(dim, heads=heads, head_dim=head_dim,
                           cross_attention_dim=cross_attention_dim, opts=opts, rngs=rngs)
    self.norm3 = layers.layer_norm(dim, 1e-5, rngs=rngs, **opts.kw)
    self.ff = FeedForward(dim, opts=opts, rngs=rngs)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm(eps 1e-6) -> proj_in -> transformer blocks -> proj_out, plus the input residual.

  ``proj_in``/``proj_out`` are Linear layers for both ``use_linear_projection`` settings: a 1x1
  conv applied before flattening equals a Linear after it (the mapping table reshapes).
  """

  def __init__(self, channels: int, *, heads: int, num_layers: int, cross_attention_dim: int,
               groups: int, opts: _Opts, rngs: nnx.Rngs):
    head_dim = channels // heads
    self.norm = layers.group_norm(channels, groups, 1e-6, rngs=rngs, **opts.kw)
    self.proj_in = layers.dense(channels, channels, rngs=rngs, **opts.kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads=heads, head_dim=head_dim,
                              cross_attention_dim=cross_attention_dim, opts=opts, rngs=rngs)
        for _ in range(num_layers)])
    self.proj_out = layers.dense(channels, channels, axes=("mlp", "embed"), rngs=rngs, **opts.kw)

  def __call__(self, x, context):
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    return self.proj_out(tokens).reshape(b, h, w, c) + x


class _UNetLevel(nnx.Module):
  """Resnets (+ one Transformer2DModel after each for the CrossAttn* kinds) of one UNet level."""

  def __init__(self, spec, *, temb_channels: int, groups: int, eps: float, opts: _Opts,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(*spec.resnet_io(i), temb_channels=temb_channels, groups=groups, eps=eps,
                      opts=opts, rngs=rngs)
        for i in range(spec.num_layers)])
    self.attentions = nnx.List([
        Transformer2DModel(spec.out_channels, heads=spec.heads, num_layers=spec.transformer_layers,
                           cross_attention_dim=spec.cross_attention_dim, groups=groups, opts=opts,
                           rngs=rngs)
        for _ in range(spec.num_layers)]) if spec.cross_attention else None

  def _layer(self, i, x, temb, context):
    x = self.resnets[i](x, temb)
    return self.attentions[i](x, context) if self.attentions is not None else x


class UNetDownBlock(_UNetLevel):
  """``DownBlock2D`` or ``CrossAttnDownBlock2D``.

  Returns (hidden, skips): one skip per resnet(+attention) and one per downsampler.
  """

  def __init__(self, spec, *, downsample_padding: int, opts: _Opts, rngs: nnx.Rngs, **kw):
    super().__init__(spec, opts=opts, rngs=rngs, **kw)
    self.downsamplers = nnx.List([
        Downsample2D(spec.out_channels, padding=downsample_padding, opts=opts, rngs=rngs)
    ]) if spec.resample else None

  def __call__(self, x, temb, context):
    skips = []
    for i in range(len(self.resnets)):
      x = self._layer(i, x, temb, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class UNetUpBlock(_UNetLevel):
  """``UpBlock2D`` or ``CrossAttnUpBlock2D``: each resnet eats concat([h, skip]) (h first)."""

  def __init__(self, spec, *, opts: _Opts, rngs: nnx.Rngs, **kw):
    super().__init__(spec, opts=opts, rngs=rngs, **kw)
    self.upsamplers = nnx.List([Upsample2D(spec.out_channels, opts=opts, rngs=rngs)
                                ]) if spec.resample else None

  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i in range(len(self.resnets)):
      x = self._layer(i, jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nnx.Module):
  """resnet -> (transformer -> resnet) x num_layers."""

  def __init__(self, channels: int, *, heads: int, transformer_layers: int,
               cross_attention_dim: int, temb_channels: int, groups: int, eps: float,
               output_scale_factor: float, num_layers: int = 1, opts: _Opts, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=groups, eps=eps,
                      output_scale_factor=output_scale_factor, opts=opts, rngs=rngs)
        for _ in range(num_layers + 1)])
    self.attentions = nnx.List([
        Transformer2DModel(channels, heads=heads, num_layers=transformer_layers,
                           cross_attention_dim=cross_attention_dim, groups=groups, opts=opts,
                           rngs=rngs)
        for _ in range(num_layers)])

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    for i, attn in enumerate(self.attentions):
      x = self.resnets[i + 1](attn(x, context), temb)
    return x
