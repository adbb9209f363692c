"""Z-Image's single-stream DiT (diffusers ``ZImageTransformer2DModel``) in Flax NNX.

diffusers takes lists of variable-length items and pads them itself; here the call has fixed
shapes and masks, and reproduces diffusers' per-item result (tests/test_zimage.py checks it):

* caption tokens are first compacted (the pipeline passes ``embeds[i][mask[i]]``), then item i
  keeps ``ceil32(n_i)`` of them, the last ``ceil32(n_i) - n_i`` replaced by the learned
  ``cap_pad_token``; positions past that are masked out as attention keys;
* caption token j has RoPE ids ``(1 + j, 0, 0)`` (its own pad tokens included); image token (h, w)
  has ``(ceil32(n_i) + 1, h, w)``, so the image ids depend on the item's caption length; image pad
  tokens (``x_pad_token``, up to a multiple of 32) have ``(0, 0, 0)`` and ARE attended, as in
  diffusers;
* the unified sequence is ``[image (padded), caption (padded)]``; only key masking differs.

The 30 main layers (and each refiner stack) are one module with a leading layer axis on every
parameter, run with ``lax.scan`` so compile time and memory do not grow with depth.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models.config_fields import check_field
from didr_jax.models.attention import check_attention_impl, dot_product_attention
from didr_jax.models.layers import RMSNorm, dense
from didr_jax.models.remat import REMAT_POLICIES, maybe_remat

SEQ_MULTI_OF = 32           # diffusers pads image and caption token counts to this multiple
ADALN_EMBED_DIM = 256       # adaLN input width is min(dim, 256)
FREQ_EMBED_DIM = 256        # sinusoidal timestep features
T_MID = 1024                # TimestepEmbedder mid_size
QK_NORM_EPS = 1e-5          # diffusers' Attention(eps=1e-5) ignores norm_eps
_CONFIG_FIELDS = ("all_patch_size", "all_f_patch_size", "in_channels", "dim", "n_layers",
                  "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm",
                  "cap_feat_dim", "siglip_feat_dim", "rope_theta", "t_scale", "axes_dims",
                  "axes_lens")


_check = functools.partial(check_field, where="ZImage config")


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
  """The architecture; defaults are diffusers' (Z-Image-Turbo, 6B)."""
  patch_size: int = 2
  f_patch_size: int = 1
  in_channels: int = 16
  dim: int = 3840
  n_layers: int = 30
  n_refiner_layers: int = 2
  n_heads: int = 30
  n_kv_heads: int = 30      # stored for round trips; diffusers' Attention never uses it
  norm_eps: float = 1e-5
  qk_norm: bool = True
  cap_feat_dim: int = 2560
  rope_theta: float = 256.0
  t_scale: float = 1000.0
  axes_dims: tuple = (32, 48, 48)
  axes_lens: tuple = (1024, 512, 512)

  def __post_init__(self):
    for f in ("patch_size", "in_channels", "dim", "n_layers", "n_heads", "cap_feat_dim"):
      v = getattr(self, f)
      _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, f"{v!r} must be >= 1")
    _check(self.f_patch_size == 1, "all_f_patch_size",
           f"{self.f_patch_size}: only single-frame images (f_patch_size 1) are supported")
    _check(self.n_refiner_layers >= 0, "n_refiner_layers", f"{self.n_refiner_layers} < 0")
    _check(self.dim % self.n_heads == 0, "n_heads",
           f"{self.n_heads} does not divide dim {self.dim}")
    _check(len(self.axes_dims) == 3 and len(self.axes_lens) == 3, "axes_dims",
           f"{self.axes_dims} / axes_lens {self.axes_lens}: need 3 axes (frame, height, width)")
    _check(all(d % 2 == 0 and d > 0 for d in self.axes_dims), "axes_dims",
           f"{self.axes_dims}: every entry must be positive and even")
    _check(sum(self.axes_dims) == self.dim // self.n_heads, "axes_dims",
           f"{self.axes_dims} must sum to the head dim {self.dim // self.n_heads}")
    _check(self.norm_eps > 0, "norm_eps", f"{self.norm_eps} must be > 0")
    _check(isinstance(self.qk_norm, bool), "qk_norm", f"{self.qk_norm!r} must be true/false")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def adaln_dim(self) -> int:
    return min(self.dim, ADALN_EMBED_DIM)

  @property
  def ffn_dim(self) -> int:
    return int(self.dim / 3 * 8)   # diffusers' exact expression (3840 -> 10240, 64 -> 170)

  @classmethod
  def from_dict(cls, d: dict) -> "ZImageConfig":
    """From diffusers' config.json; underscore keys (``_class_name``...) are ignored."""
    unknown = sorted(k for k in d if not k.startswith("_") and k not in _CONFIG_FIELDS)
    if unknown:
      raise ValueError(f"ZImage config: unknown field(s) {unknown}")
    if d.get("siglip_feat_dim") is not None:
      raise ValueError(f"ZImage config field 'siglip_feat_dim': {d['siglip_feat_dim']!r} "
                       "(the Omni variant) is not supported; only null")
    kw = {k: d[k] for k in _CONFIG_FIELDS if k in d
          and k not in ("all_patch_size", "all_f_patch_size", "siglip_feat_dim")}
    for f in ("all_patch_size", "all_f_patch_size"):
      if f in d:
        v = list(d[f])
        _check(len(v) == 1, f, f"{d[f]!r}: exactly one patch size is supported")
        kw[f[4:]] = int(v[0])
    for f in ("axes_dims", "axes_lens"):
      if f in kw:
        kw[f] = tuple(int(v) for v in kw[f])
    return cls(**kw)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["all_patch_size"], d["all_f_patch_size"] = [d.pop("patch_size")], [d.pop("f_patch_size")]
    d["axes_dims"], d["axes_lens"] = list(self.axes_dims), list(self.axes_lens)
    return {"_class_name": "ZImageTransformer2DModel", "siglip_feat_dim": None, **d}


def apply_rope(x, cos, sin):
  """diffusers' rotation of x [B, S, H, D] as complex pairs (x[2i], x[2i+1]) by angles whose
  cos / sin are [B, S, D / 2], in float32, cast back to x's dtype."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = pairs[..., 0], pairs[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ZImageConfig, *, kw, rngs):
    d = cfg.dim
    for name in ("to_q", "to_k", "to_v"):
      setattr(self, name, dense(d, d, axes=("embed", "heads"), use_bias=False, rngs=rngs, **kw))
    self.to_out = dense(d, d, axes=("heads", "embed"), use_bias=False, rngs=rngs, **kw)
    if cfg.qk_norm:
      self.norm_q = RMSNorm(cfg.head_dim, QK_NORM_EPS, **kw, scale_in_float32=True)
      self.norm_k = RMSNorm(cfg.head_dim, QK_NORM_EPS, **kw, scale_in_float32=True)
    self.qk_norm, self.heads, self.head_dim = cfg.qk_norm, cfg.n_heads, cfg.head_dim

  def __call__(self, x, cos, sin, keep, implementation):
    b, s, _ = x.shape
    shape = (b, s, self.heads, self.head_dim)
    q, k, v = (self.to_q(x).reshape(shape), self.to_k(x).reshape(shape),
               self.to_v(x).reshape(shape))
    if self.qk_norm:
      q, k = self.norm_q(q), self.norm_k(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = dot_product_attention(q, k, v, implementation=implementation, mask=keep)
    return self.to_out(o.reshape(b, s, -1))


class FeedForward(nnx.Module):
  """Bias-free SwiGLU: w2(silu(w1 x) * w3 x)."""

  def __init__(self, cfg: ZImageConfig, *, kw, rngs):
    d, m = cfg.dim, cfg.ffn_dim
    self.w1 = dense(d, m, axes=("embed", "mlp"), use_bias=False, rngs=rngs, **kw)
    self.w2 = dense(m, d, axes=("mlp", "embed"), use_bias=False, rngs=rngs, **kw)
    self.w3 = dense(d, m, axes=("embed", "mlp"), use_bias=False, rngs=rngs, **kw)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
  """``ZImageTransformerBlock``: sandwich-normed attention and FFN, tanh-gated adaLN optional."""

  def __init__(self, cfg: ZImageConfig, *, modulation: bool, kw, rngs):
    self.attention = Attention(cfg, kw=kw, rngs=rngs)
    self.feed_forward = FeedForward(cfg, kw=kw, rngs=rngs)
    for name in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
      setattr(self, name, RMSNorm(cfg.dim, cfg.norm_eps, **kw, scale_in_float32=True))
    if modulation:
      # 256 x 4 dim per layer (118M parameters over 30 layers): its input axis takes the FSDP
      # ("embed") axis too, else it stays whole on every device (docs/benchmarks.md, LoRA)
      self.adaLN_modulation = dense(cfg.adaln_dim, 4 * cfg.dim, axes=("embed", "mlp"), rngs=rngs,
                                    **kw)
    self.modulation = modulation

  def __call__(self, x, cos, sin, keep, adaln, implementation):
    def attn(h):
      return self.attention(h, cos, sin, keep, implementation)
    if not self.modulation:
      x = x + self.attention_norm2(attn(self.attention_norm1(x)))
      return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(
        self.adaLN_modulation(adaln)[:, None, :], 4, axis=-1)
    a = attn(self.attention_norm1(x) * (1 + scale_msa))
    x = x + jnp.tanh(gate_msa) * self.attention_norm2(a)
    ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
    return x + jnp.tanh(gate_mlp) * self.ffn_norm2(ff)


def _stack(n: int, make, rngs):
  """``n`` blocks as ONE module whose parameters carry a leading (unsharded) layer axis."""
  if n == 0:
    return None
  inner = nnx.Rngs(params=rngs.params())   # works with nnx.Rngs and with ShapeOnlyRngs

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
  def create(r):
    return make(r)
  return create(inner)


def _scan(stack, x, args, remat: str):
  """Run the stacked blocks over ``x`` with ``lax.scan``, each step under the remat policy."""
  if stack is None:
    return x
  graphdef, state = nnx.split(stack)

  def body(h, layer_state):
    return shd.constrain_batch(nnx.merge(graphdef, layer_state)(shd.constrain_batch(h), *args)), None
  return jax.lax.scan(maybe_remat(body, remat, prevent_cse=False), x, state)[0]


def rope_tables(cfg: ZImageConfig) -> list[np.ndarray]:
  """Per-axis angle tables [axes_lens[a], axes_dims[a] / 2] built as diffusers does (float64
  outer product rounded to float32)."""
  out = []
  for d, e in zip(cfg.axes_dims, cfg.axes_lens):
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    out.append(np.outer(np.arange(e, dtype=np.float64), freqs).astype(np.float32))
  return out


def _angles(tables, ids):
  """ids [B, S, 3] int -> angles [B, S, head_dim / 2]."""
  return jnp.concatenate([jnp.asarray(t)[ids[..., a]] for a, t in enumerate(tables)], axis=-1)


def _ceil(n, m=SEQ_MULTI_OF):
  return (n + m - 1) // m * m


class ZImageTransformer2DModel(nnx.Module):
  """``model(x [B,H,W,C], t [B], cap_feats [B,L,cap_dim], cap_mask [B,L] bool) -> [B,H,W,C]``.

  ``t`` is what diffusers' ``forward`` receives (the pipeline's (1000 - t) / 1000); the output is
  diffusers' ``forward`` output (before the pipeline negates it).
  """

  def __init__(self, cfg: ZImageConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "xla", remat: str = "none", rngs):
    check_attention_impl(attention)
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {remat!r} unknown; choose one of {REMAT_POLICIES}")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.config, self.dtype, self.attention, self.remat = cfg, dtype, attention, remat
    d, p = cfg.dim, cfg.patch_size
    self.x_embedder = dense(p * p * cfg.in_channels, d, axes=(None, "embed"), rngs=rngs, **kw)
    self.t_linear_1 = dense(FREQ_EMBED_DIM, T_MID, axes=(None, "mlp"), rngs=rngs, **kw)
    self.t_linear_2 = dense(T_MID, cfg.adaln_dim, axes=("mlp", None), rngs=rngs, **kw)
    self.cap_norm = RMSNorm(cfg.cap_feat_dim, cfg.norm_eps, **kw, scale_in_float32=True)
    self.cap_linear = dense(cfg.cap_feat_dim, d, axes=(None, "embed"), rngs=rngs, **kw)
    self.x_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), out_sharding=(None, "embed"))
    self.cap_pad_token = nnx.Param(jnp.zeros((1, d), param_dtype), out_sharding=(None, "embed"))
    block = lambda mod: (lambda r: Block(cfg, modulation=mod, kw=kw, rngs=r))
    self.noise_refiner = _stack(cfg.n_refiner_layers, block(True), rngs)
    self.context_refiner = _stack(cfg.n_refiner_layers, block(False), rngs)
    self.layers = _stack(cfg.n_layers, block(True), rngs)
    self.final_adaLN = dense(cfg.adaln_dim, d, axes=(None, "embed"), rngs=rngs, **kw)
    self.final_linear = dense(d, p * p * cfg.in_channels, axes=("embed", None), rngs=rngs, **kw)

  def _t_embed(self, t):
    half = FREQ_EMBED_DIM // 2
    freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * self.config.t_scale * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return self.t_linear_2(jax.nn.silu(self.t_linear_1(emb)))

  def _check_lengths(self, ht, wt, lp):
    lens = self.config.axes_lens
    if lp + 1 >= lens[0] or ht > lens[1] or wt > lens[2]:
      raise ValueError(f"ZImage config field 'axes_lens' {lens}: too short for {lp} caption "
                       f"positions (+1) and {ht}x{wt} image tokens")

  def __call__(self, x, t, cap_feats, cap_mask=None):
    cfg, p = self.config, self.config.patch_size
    b, h, w, c = x.shape
    if h % p or w % p or c != cfg.in_channels:
      raise ValueError(f"ZImage input {x.shape}: H, W must divide by patch {p}, C must be "
                       f"in_channels {cfg.in_channels}")
    ht, wt, L = h // p, w // p, cap_feats.shape[1]
    n_img, lp = ht * wt, _ceil(L)
    n_img_p = _ceil(n_img)
    self._check_lengths(ht, wt, lp)
    mask = jnp.ones((b, L), bool) if cap_mask is None else jnp.asarray(cap_mask).astype(bool)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    adaln = self._t_embed(t).astype(self.dtype)
    tables = rope_tables(cfg)
    layer_args = lambda cs, keep, mod: (cs[0], cs[1], keep, mod, self.attention)

    # Caption: real tokens first (the pipeline's embeds[mask]), ceil32(n) kept, tail = pad token.
    order = jnp.argsort(~mask, axis=1, stable=True)
    cap = jnp.take_along_axis(cap_feats, order[:, :, None], axis=1)
    cap = jnp.pad(cap, ((0, 0), (0, lp - L), (0, 0)))
    n_cap = mask.sum(axis=1)
    j = jnp.arange(lp)[None, :]
    cap_keep = j < _ceil(n_cap)[:, None]
    cap = self.cap_linear(self.cap_norm(cap))
    cap_pad = self.cap_pad_token.get_value().astype(cap.dtype)
    cap = jnp.where((j >= n_cap[:, None])[..., None], cap_pad, cap)
    zeros = jnp.zeros((b, lp), jnp.int32)
    cap_ids = jnp.stack([jnp.broadcast_to(1 + j, (b, lp)), zeros, zeros], -1)
    a = _angles(tables, cap_ids)
    cap_cs = (jnp.cos(a), jnp.sin(a))
    cap = _scan(self.context_refiner, cap, layer_args(cap_cs, cap_keep[:, None, None, :], None),
                self.remat)

    # Image: patchify (ph, pw, c order), pad to a multiple of 32 with x_pad_token at ids (0,0,0).
    patches = x.reshape(b, ht, p, wt, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n_img, -1)
    img = self.x_embedder(patches)
    pad_tok = jnp.broadcast_to(self.x_pad_token.get_value().astype(img.dtype),
                               (b, n_img_p - n_img, cfg.dim))
    img = jnp.concatenate([img, pad_tok], axis=1)
    hh, ww = jnp.meshgrid(jnp.arange(ht), jnp.arange(wt), indexing="ij")
    hw = jnp.stack([hh.reshape(-1), ww.reshape(-1)], -1)
    img_ids = jnp.concatenate([
        jnp.concatenate([jnp.broadcast_to((_ceil(n_cap) + 1)[:, None, None], (b, n_img, 1)),
                         jnp.broadcast_to(hw[None], (b, n_img, 2))], -1),
        jnp.zeros((b, n_img_p - n_img, 3), hw.dtype)], axis=1)
    a = _angles(tables, img_ids)
    img_cs = (jnp.cos(a), jnp.sin(a))
    # The refiners are independent; a barrier orders the noise refiner after the context one so
    # that every device meets their FSDP collectives in one order (XLA:CPU runs independent
    # collectives concurrently, and its simulated devices deadlocked otherwise: docs/models.md).
    img, cap = jax.lax.optimization_barrier((img, cap))
    img = _scan(self.noise_refiner, img, layer_args(img_cs, None, adaln), self.remat)

    # Unified [image, caption]: masked caption slots are never attended (keys only).
    u = jnp.concatenate([img, cap], axis=1)
    u_cs = tuple(jnp.concatenate([ic, cc], axis=1) for ic, cc in zip(img_cs, cap_cs))
    keep = jnp.concatenate([jnp.ones((b, n_img_p), bool), cap_keep], axis=1)[:, None, None, :]
    u = _scan(self.layers, u, layer_args(u_cs, keep, adaln), self.remat)

    # Final layer (non-affine LayerNorm, eps 1e-6) on the real image tokens, then unpatchify.
    u = u[:, :n_img].astype(jnp.float32)
    mean = u.mean(-1, keepdims=True)
    u = (u - mean) * jax.lax.rsqrt(((u - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    scale = 1 + self.final_adaLN(jax.nn.silu(adaln))[:, None, :]
    out = self.final_linear((u.astype(self.dtype) * scale))
    return out.reshape(b, ht, wt, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def flow_velocity(model: ZImageTransformer2DModel, x, sigma, cap_feats, cap_mask=None):
  """The flow-matching velocity u = eps - x0 at noise level ``sigma`` [B] (x = (1 - sigma) x0 +
  sigma eps), in the Z-Image pipeline's convention: the transformer is fed 1 - sigma and predicts
  x0 - eps (the pipeline negates it before its scheduler step)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return -model(x, 1.0 - sigma, cap_feats, cap_mask).astype(jnp.float32)
