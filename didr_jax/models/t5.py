"""The T5 v1.1 encoder (PixArt-alpha's text encoder, ``transformers.T5EncoderModel``) in Flax NNX.

Architecture, as in transformers' ``models/t5/modeling_t5.py``: token embedding (no absolute
positions); pre-norm blocks of self-attention then a gated-GELU feed-forward (``wo(gelu_tanh(wi_0 x)
* wi_1 x)``); every norm is T5's RMS norm (no mean, no bias, statistics in float32); q.k is *not*
scaled by 1/sqrt(d_kv) (T5 folds that into its init); a learned bias per (relative-position bucket,
head) is added to the logits; its table lives in the first layer in transformers and is shared by
every layer, so here it is one parameter of the model. A final RMS norm gives
``last_hidden_state``. Weights come from ``t5_mapping.py``.

Runtime choices mirror ``clip.py`` (``dtype``, ``param_dtype``, ``attention``, ``remat``). The
residual stream stays float32 whatever ``dtype`` is (element-wise, so cheap): T5's residuals grow
far beyond the normalised scale and bf16 sums would drop the blocks' small updates. transformers in
bf16 keeps it in bf16 (its ``_keep_in_fp32_modules = ["wo"]`` applies to float16 only).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.models.config_fields import check_field
from didr_jax.models.attention import check_attention_impl
from didr_jax.models.layers import RMSNorm, dense, embedding
from didr_jax.models.remat import REMAT_POLICIES, maybe_remat

FEED_FORWARD_PROJS = ("gated-gelu",)
# T5's attention is softmax(q k^T + bias), unscaled; ``attention.dot_product_attention`` always
# scales and takes no bias, so it is computed here ('xla', float32) or by jax.nn ('jax').
T5_ATTENTION_IMPLEMENTATIONS = ("xla", "jax")
# transformers' T5Config defaults, for fields a config.json omits (tests/test_t5.py pins them).
HF_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6, feed_forward_proj="relu", is_decoder=False)
_INT_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance")


_check = functools.partial(check_field, where="T5 config")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """The encoder's architecture; defaults are google/t5-v1_1-xxl (PixArt-alpha's text encoder)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  def __post_init__(self):
    for name in _INT_FIELDS:
      value = getattr(self, name)
      _check(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1,
             name, f"must be a positive integer, got {value!r}")
    buckets, dist = self.relative_attention_num_buckets, self.relative_attention_max_distance
    # bidirectional: half the buckets per direction, half of those exact, the rest log-spaced
    _check(buckets >= 4, "relative_attention_num_buckets", f"{buckets} < 4 (no log-spaced buckets)")
    _check(dist > buckets // 4, "relative_attention_max_distance",
           f"{dist} must exceed the exact range {buckets // 4} of {buckets} buckets")
    _check(isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0,
           "layer_norm_epsilon", f"must be a positive number, got {self.layer_norm_epsilon!r}")
    _check(self.feed_forward_proj in FEED_FORWARD_PROJS, "feed_forward_proj",
           f"{self.feed_forward_proj!r} unsupported; choose one of {FEED_FORWARD_PROJS} (T5 v1.1)")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_hf_config(cls, d: dict, where: str = "config") -> "T5EncoderConfig":
    """From a transformers T5 ``config.json`` dict (T5EncoderModel or a full T5 folder)."""
    if d.get("model_type", "t5") != "t5":
      raise ValueError(f"{where}: T5 config field 'model_type': {d['model_type']!r} is not 't5'")
    d = {**HF_T5_DEFAULTS, **d}
    if d["is_decoder"]:
      raise ValueError(f"{where}: T5 config field 'is_decoder' is true; only the encoder is "
                       "supported")
    try:
      return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """[q_len, k_len] int32 buckets of (key - query) positions: transformers' bidirectional
  ``T5Attention._relative_position_bucket``, in float32 like torch; static, so computed once at
  trace time."""
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  safe = np.maximum(rel, max_exact).astype(np.float32)  # no log(0): those use the exact branch
  log_ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def _param(rngs, init, shape, axes, param_dtype):
  return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=axes)


class SelfAttention(nnx.Module):
  """Unscaled multi-head self-attention with T5's additive position bias and a key padding mask."""

  def __init__(self, cfg: T5EncoderConfig, *, attention, rngs, dtype, param_dtype):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
    self.k = dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
    self.v = dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
    self.o = dense(cfg.inner_dim, cfg.d_model, axes=("heads", "embed"), **kw)
    self.heads, self.d_kv, self.attention = cfg.num_heads, cfg.d_kv, attention

  def __call__(self, x, bias, mask):
    """x [B, T, D]; bias [1, H, T, T] float32; mask [B, T] bool (True = real token)."""
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    keep = mask[:, None, None, :]
    if self.attention == "jax":
      o = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=keep, scale=1.0)
    else:  # float32 reference, the same as transformers' eager path
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
      logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.o(o.reshape(b, t, self.heads * self.d_kv))


class GatedFeedForward(nnx.Module):
  """``wo(gelu_new(wi_0 x) * wi_1 x)``; transformers' gelu_new is GELU's tanh form."""

  def __init__(self, cfg: T5EncoderConfig, *, rngs, dtype, param_dtype):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.wi_0 = dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
    self.wi_1 = dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
    self.wo = dense(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
  """Pre-norm block: x += attn(norm(x)); x += ff(norm(x)) (transformers' layer[0] and layer[1])."""

  def __init__(self, cfg: T5EncoderConfig, *, attention, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
    self.attention = SelfAttention(cfg, attention=attention, **kw)
    self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
    self.ff = GatedFeedForward(cfg, **kw)

  def __call__(self, x, bias, mask):
    x = x + self.attention(self.attention_norm(x), bias, mask).astype(jnp.float32)
    return x + self.ff(self.ff_norm(x)).astype(jnp.float32)


def _run_block(block, x, bias, mask):
  return block(x, bias, mask)


class T5EncoderModel(nnx.Module):
  """``(input_ids [B, L] int, attention_mask [B, L] (1 = real)) -> last_hidden_state [B, L, D]``.

  Padded keys are masked out of every softmax, so padding never changes the real tokens' outputs
  (padded positions still get outputs, as in transformers). ``output_hidden_states=True`` also
  returns transformers' ``hidden_states``: the embeddings, each block's output but the last, and
  ``last_hidden_state`` (num_layers + 1 entries).
  """

  def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    check_attention_impl(attention)
    if attention not in T5_ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {attention!r} has no T5 path (its additive "
                       f"relative-position bias is untested there); choose one of "
                       f"{T5_ATTENTION_IMPLEMENTATIONS}")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {remat!r} unknown; choose one of {REMAT_POLICIES}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config, self.dtype, self.remat = cfg, dtype, remat
    self.shared = embedding(cfg.vocab_size, cfg.d_model, **kw)
    self.relative_attention_bias = _param(
        rngs, nnx.initializers.normal(cfg.d_model ** -0.5),
        (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"), param_dtype)
    self.block = nnx.List([T5Block(cfg, attention=attention, **kw) for _ in range(cfg.num_layers)])
    self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)

  def position_bias(self, length: int):
    """[1, H, L, L] float32 bias shared by every layer (transformers' ``compute_bias``)."""
    cfg = self.config
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    table = self.relative_attention_bias.get_value().astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"T5 input_ids must be integer [batch, seq], got {ids.dtype}{ids.shape}")
    if attention_mask is None:
      mask = jnp.ones(ids.shape, bool)
    else:
      mask = jnp.asarray(attention_mask)
      if mask.shape != ids.shape:
        raise ValueError(f"T5 attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
      mask = mask.astype(bool)
    bias = self.position_bias(ids.shape[1])
    x = self.shared(ids)
    hidden = [x]
    x = x.astype(jnp.float32)
    run = maybe_remat(_run_block, self.remat)
    for block in self.block:
      x = run(block, x, bias, mask)
      hidden.append(x)
    last = self.final_layer_norm(x)
    if not output_hidden_states:
      return last
    return last, tuple(hidden[:-1]) + (last,)
