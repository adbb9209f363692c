"""Flax NNX port of diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha, the DiT of DI++), NHWC.

Call form: ``model(x, t, encoder_hidden_states, encoder_attention_mask, added_cond=None)`` with
``x`` [B, H, W, in_channels], ``t`` [B] (or a scalar), ``encoder_hidden_states`` [B, L,
caption_channels], ``encoder_attention_mask`` [B, L] (1 = real token, or None) and, when the config
uses additional conditions, ``added_cond = {"resolution": [B, 2], "aspect_ratio": [B, 1]}``.
Returns [B, H, W, out_channels] (PixArt learns sigma: channels [:in_channels] are eps).

The ``num_layers`` identical blocks live in ONE module whose parameters carry a leading layer axis
(built with ``nnx.vmap``) and run under ``jax.lax.scan``, so compile time does not grow with depth;
the remat policy wraps the scanned block body. Numerics follow diffusers: adaLN-single (one shared
timestep MLP gives 6*hidden modulations, each block adds its own ``scale_shift_table``), no norm
before cross-attention, caption padding as an additive -10000 bias (as diffusers converts a 2-D
mask), the fixed 2-D sin-cos position embedding recomputed for the input's grid.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models import layers
from didr_jax.models.attention import dot_product_attention
from didr_jax.models.remat import maybe_remat
from didr_jax.models.unet import DiffusersConfig, unsupported
from didr_jax.models.unet_blocks import TimestepEmbedding, model_options, timestep_embedding

ACTIVATIONS = {"gelu-approximate": True, "gelu": False}  # name -> tanh approximation
# Fields of the legacy ``Transformer2DModel`` config.json that the original PixArt checkpoints
# carry; PixArtTransformer2DModel ignores them, so we accept only the values PixArt implies.
LEGACY_FIELDS = {"double_self_attention": (False,), "num_vector_embeds": (None,),
                 "only_cross_attention": (False,), "use_linear_projection": (False,)}
_MASK_BIAS = -10000.0  # diffusers' value for a discarded caption token


@dataclasses.dataclass(frozen=True)
class PixArtConfig(DiffusersConfig):
  """The fields of diffusers' ``PixArtTransformer2DModel`` config.json (defaults as in diffusers)."""
  CLASS_NAME = "PixArtTransformer2DModel"
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: Optional[int] = 8
  num_layers: int = 28
  dropout: float = 0.0
  norm_num_groups: int = 32
  cross_attention_dim: Optional[int] = 1152
  attention_bias: bool = True
  sample_size: int = 128
  patch_size: int = 2
  activation_fn: str = "gelu-approximate"
  num_embeds_ada_norm: Optional[int] = 1000
  upcast_attention: bool = False
  norm_type: str = "ada_norm_single"
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-6
  interpolation_scale: Optional[float] = None
  use_additional_conditions: Optional[bool] = None
  caption_channels: Optional[int] = None
  attention_type: Optional[str] = "default"

  @classmethod
  def from_dict(cls, config: dict):
    """Also reads legacy ``Transformer2DModel`` PixArt configs (their extra fields must be inert)."""
    config = dict(config)
    for field, allowed in LEGACY_FIELDS.items():
      value = config.pop(field, allowed[0])
      if value not in allowed:
        unsupported(cls.CLASS_NAME, field, value, f"only {allowed} (PixArt ignores it)")
    return super().from_dict(config)

  def validate(self):
    """Raise naming the first field whose value this port does not implement.

    ``norm_num_groups`` and ``num_embeds_ada_norm`` (beyond not being null) are unused by
    diffusers' PixArt; ``upcast_attention`` is accepted because the softmax is always float32.
    """
    what = self.CLASS_NAME
    fixed = {"norm_type": ("ada_norm_single",), "dropout": (0, 0.0),
             "norm_elementwise_affine": (False,), "attention_type": ("default", None),
             "activation_fn": tuple(ACTIVATIONS), "attention_bias": (True, False),
             "upcast_attention": (True, False), "use_additional_conditions": (None, True, False)}
    for field, allowed in fixed.items():
      if getattr(self, field) not in allowed:
        unsupported(what, field, getattr(self, field), f"only {allowed} implemented")
    for field in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                  "sample_size", "patch_size"):
      v = getattr(self, field)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        unsupported(what, field, v, "must be a positive int")
    if self.num_embeds_ada_norm is None:
      unsupported(what, "num_embeds_ada_norm", None, "ada_norm_single needs a value")
    if self.cross_attention_dim is None:
      unsupported(what, "cross_attention_dim", None, "PixArt without cross-attention")
    if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
      unsupported(what, "cross_attention_dim", self.cross_attention_dim,
                  f"caption_projection outputs inner_dim {self.inner_dim}")
    if self.inner_dim % 4:
      unsupported(what, "attention_head_dim", self.attention_head_dim,
                  f"inner_dim {self.inner_dim} must be divisible by 4 (2-D sin-cos embedding)")
    if self.additional_conditions and self.inner_dim % 3:
      unsupported(what, "use_additional_conditions", self.use_additional_conditions,
                  f"inner_dim {self.inner_dim} must be divisible by 3")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def additional_conditions(self) -> bool:
    """diffusers: ``use_additional_conditions`` or, when null, ``sample_size == 128``."""
    if self.use_additional_conditions is None:
      return self.sample_size == 128
    return bool(self.use_additional_conditions)

  @property
  def pos_interpolation_scale(self) -> float:
    """diffusers: the config value or ``max(sample_size // 64, 1)``."""
    if self.interpolation_scale is not None:
      return self.interpolation_scale
    return max(self.sample_size // 64, 1)

  @property
  def base_size(self) -> int:
    return self.sample_size // self.patch_size


def sincos_pos_embed(dim: int, gh: int, gw: int, base_size: int, scale: float) -> np.ndarray:
  """diffusers ``get_2d_sincos_pos_embed`` for a (gh, gw) patch grid -> [gh*gw, dim] float32.

  Token (i, j) (row-major) gets [emb(w_j), emb(h_i)]: the first half encodes the column.
  """
  h = np.arange(gh, dtype=np.float32) / np.float32(gh / base_size) / np.float32(scale)
  w = np.arange(gw, dtype=np.float32) / np.float32(gw / base_size) / np.float32(scale)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def emb1d(pos):
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  hh, ww = np.meshgrid(h, w, indexing="ij")
  return np.concatenate([emb1d(ww), emb1d(hh)], axis=1).astype(np.float32)


class Attention(nnx.Module):
  """diffusers ``Attention`` as PixArt uses it: biased q/k/v (``attention_bias``), ``to_out.0``."""

  def __init__(self, dim: int, kv_dim: int, heads: int, head_dim: int, *, bias: bool, opts,
               rngs):
    inner = heads * head_dim
    self.heads, self.head_dim, self.attention = heads, head_dim, opts.attention
    self.to_q = layers.dense(dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_k = layers.dense(kv_dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_v = layers.dense(kv_dim, inner, use_bias=bias, rngs=rngs, **opts.kw)
    self.to_out = nnx.List([layers.dense(inner, dim, axes=("mlp", "embed"), rngs=rngs, **opts.kw)])

  def __call__(self, x, context, keep=None):
    """``keep``: [B, L] bool caption mask (True = real token) or None."""
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    if keep is None:
      o = dot_product_attention(q, k, v, implementation=self.attention)
    elif self.attention == "xla":
      o = _biased_attention(q, k, v, keep)
    else:  # fused kernels take a boolean mask; equal to the bias unless a row is all padding
      o = dot_product_attention(q, k, v, implementation=self.attention,
                                mask=keep[:, None, None, :])
    return self.to_out[0](o.reshape(b, t, self.heads * self.head_dim))


def _biased_attention(q, k, v, keep):
  """Reference path with diffusers' additive mask bias (so an all-padding caption matches too)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = logits + jnp.where(keep, 0.0, _MASK_BIAS)[:, None, None, :]
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class PixArtBlock(nnx.Module):
  """BasicTransformerBlock with norm_type="ada_norm_single" (norm1/norm2 have no parameters)."""

  def __init__(self, cfg: PixArtConfig, *, opts, rngs):
    d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    self.eps, self.approximate = cfg.norm_eps, ACTIVATIONS[cfg.activation_fn]
    self.scale_shift_table = _table(rngs, 6, d, opts.param_dtype)
    self.attn1 = Attention(d, d, heads, hd, bias=cfg.attention_bias, opts=opts, rngs=rngs)
    self.attn2 = Attention(d, cfg.cross_attention_dim, heads, hd, bias=cfg.attention_bias,
                           opts=opts, rngs=rngs)
    self.ff_proj = layers.dense(d, 4 * d, rngs=rngs, **opts.kw)
    self.ff_out = layers.dense(4 * d, d, axes=("mlp", "embed"), rngs=rngs, **opts.kw)

  def __call__(self, x, t6, context, keep):
    """``t6``: [B, 6, D] shared adaLN-single modulation (before this block's table)."""
    mod = (self.scale_shift_table[None] + t6).astype(x.dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
    h = _layer_norm(x, self.eps) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * self.attn1(h, h)
    x = x + self.attn2(x, context, keep)  # PixArt: no norm before cross-attention
    h = _layer_norm(x, self.eps) * (1 + scale_mlp) + shift_mlp
    h = self.ff_out(jax.nn.gelu(self.ff_proj(h), approximate=self.approximate))
    return x + gate_mlp * h


def _table(rngs, rows: int, d: int, param_dtype) -> nnx.Param:
  """A ``scale_shift_table``: randn / sqrt(d) as diffusers initialises it."""
  init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / d ** 0.5
  return nnx.Param(nnx.with_partitioning(init, (None, "embed"))(rngs.params(), (rows, d),
                                                                param_dtype))


def _layer_norm(x, eps):
  """Parameter-free LayerNorm, statistics in float32 (two-pass variance as torch)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class PixArtTransformer2DModel(nnx.Module):
  """PixArt-alpha DiT. ``attention``: xla|jax|cudnn|splash; ``remat``: none|full|dots_no_batch|offload
  (applied to the scanned block)."""

  def __init__(self, config: PixArtConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "xla", remat: str = "none", rngs):
    opts = model_options(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                         remat=remat)
    self.config, self.dtype, self.remat = config, dtype, remat
    cfg, kw, d = config, opts.kw, config.inner_dim
    p = cfg.patch_size
    self.pos_embed = nnx.Dict(proj=layers.conv(cfg.in_channels, d, p, stride=p, padding=0,
                                               rngs=rngs, **kw))
    emb = dict(timestep_embedder=TimestepEmbedding(256, d, cond_proj_dim=None, opts=opts,
                                                   rngs=rngs))
    if cfg.additional_conditions:
      for name in ("resolution_embedder", "aspect_ratio_embedder"):
        emb[name] = TimestepEmbedding(256, d // 3, cond_proj_dim=None, opts=opts, rngs=rngs)
    self.adaln_single = nnx.Dict(emb=nnx.Dict(emb), linear=layers.dense(d, 6 * d, rngs=rngs, **kw))
    self.caption_projection = nnx.data(nnx.Dict(
        linear_1=layers.dense(cfg.caption_channels, d, rngs=rngs, **kw),
        linear_2=layers.dense(d, d, rngs=rngs, **kw)) if cfg.caption_channels else None)
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    make = nnx.vmap(lambda key: PixArtBlock(cfg, opts=opts, rngs=nnx.Rngs(params=key)),
                    in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    self.transformer_blocks = make(keys)
    self.scale_shift_table = _table(rngs, 2, d, param_dtype)
    self.proj_out = layers.dense(d, p * p * cfg.output_channels, axes=("embed", None), rngs=rngs,
                                 **kw)

  def _time_embedding(self, t, added_cond, b):
    """(6*D modulation input [B, 6, D], embedded timestep [B, D]) as AdaLayerNormSingle."""
    cfg, emb = self.config, self.adaln_single["emb"]
    proj = lambda v: timestep_embedding(jnp.reshape(v, (-1,)), 256, flip_sin_to_cos=True,
                                        freq_shift=0).astype(self.dtype)
    e = emb["timestep_embedder"](proj(t))
    if cfg.additional_conditions:
      if not added_cond or added_cond.get("resolution") is None \
          or added_cond.get("aspect_ratio") is None:
        raise ValueError("this PixArt config uses additional conditions: pass added_cond with "
                         "'resolution' [B, 2] and 'aspect_ratio' [B, 1]")
      res = emb["resolution_embedder"](proj(added_cond["resolution"])).reshape(b, -1)
      ar = emb["aspect_ratio_embedder"](proj(added_cond["aspect_ratio"])).reshape(b, -1)
      e = e + jnp.concatenate([res, ar], axis=1)
    t6 = self.adaln_single["linear"](jax.nn.silu(e))
    return t6.reshape(b, 6, -1), e

  def __call__(self, x, t, encoder_hidden_states, encoder_attention_mask=None, added_cond=None):
    cfg, p = self.config, self.config.patch_size
    b, hgt, wid, _ = x.shape
    if hgt % p or wid % p:
      raise ValueError(f"input size {hgt}x{wid} is not divisible by patch_size {p}")
    gh, gw = hgt // p, wid // p
    h = self.pos_embed["proj"](x.astype(self.dtype)).reshape(b, gh * gw, -1)
    pos = sincos_pos_embed(cfg.inner_dim, gh, gw, cfg.base_size, cfg.pos_interpolation_scale)
    h = h + jnp.asarray(pos, h.dtype)[None]
    t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t, jnp.float32), (-1,)), (b,))
    t6, embedded_t = self._time_embedding(t, added_cond, b)
    ctx = encoder_hidden_states.astype(self.dtype)
    if self.caption_projection is not None:
      cp = self.caption_projection
      ctx = cp["linear_2"](jax.nn.gelu(cp["linear_1"](ctx), approximate=True))
    keep = None if encoder_attention_mask is None else jnp.asarray(encoder_attention_mask) > 0.5

    graphdef, stacked = nnx.split(self.transformer_blocks)

    def body(carry, layer):
      return shd.constrain_batch(nnx.merge(graphdef, layer)(shd.constrain_batch(carry), t6, ctx, keep)), None

    h, _ = jax.lax.scan(maybe_remat(body, self.remat, prevent_cse=False), h, stacked)
    shift, scale = jnp.split((self.scale_shift_table[None] + embedded_t[:, None]).astype(h.dtype),
                             2, axis=1)
    h = _layer_norm(h, 1e-6) * (1 + scale) + shift
    h = self.proj_out(h).reshape(b, gh, gw, p, p, cfg.output_channels)
    return h.transpose(0, 1, 3, 2, 4, 5).reshape(b, hgt, wid, cfg.output_channels)
