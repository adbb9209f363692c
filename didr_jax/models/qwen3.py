"""The Qwen3 decoder stack in Flax NNX, used as a text ENCODER (Z-Image's Qwen3-4B).

Z-Image conditions on ``hidden_states[-2]`` of a transformers ``Qwen3Model`` run with
``output_hidden_states=True``, so :class:`Qwen3TextEncoder` returns every hidden state in
transformers' order: the embeddings, then each layer's output, the last one with the final
``norm`` applied (transformers overwrites ``hidden_states[-1]`` with ``last_hidden_state``).
There is no ``lm_head``: an encoder never needs logits. Attribute names follow Hugging Face so the
table in ``qwen3_mapping.py`` stays one-to-one; the layers are a Python loop over an ``nnx.List``
with optional remat, exactly like ``clip.py``.

Numerics mirror ``transformers/models/qwen3/modeling_qwen3.py``: RMSNorm statistics in float32
with the weight applied after casting back; per-head ``q_norm``/``k_norm`` BEFORE the rotary
embedding; RoPE with the rotate-half convention (``cat(-x2, x1)``) on positions ``0..L-1`` (what
transformers uses when no ``position_ids`` are given, whatever the mask); grouped-query attention
with key/value head ``h // (heads / kv_heads)`` serving query head ``h``; causal AND key-padding
mask; softmax in float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models.config_fields import check_field
from didr_jax.models.attention import dot_product_attention
from didr_jax.models.clip import RuntimeOptions
from didr_jax.models.layers import RMSNorm, dense, embedding
from didr_jax.models.remat import maybe_remat

# transformers' Qwen3Config defaults, for fields a config.json omits (tests/test_qwen3.py pins them
# against the installed transformers). ``rope_theta`` falls back to PreTrainedConfig.default_theta.
HF_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                   head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                   use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                   rope_theta=10000.0)
# Layer types that mean ordinary causal attention ("attention" is transformers' legacy spelling).
FULL_ATTENTION_TYPES = ("full_attention", "attention")
_ROPE_KEYS = ("rope_type", "type", "rope_theta")


def _check(cond: bool, field: str, msg: str, where: str = "Qwen3 config"):
  check_field(cond, field, msg, where)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """The architecture; the defaults are Qwen3-4B (Z-Image's text encoder)."""
  vocab_size: int = 151936
  hidden_size: int = 2560
  intermediate_size: int = 9728
  num_hidden_layers: int = 36
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int = 128          # NOT hidden_size // heads in general (Qwen3-4B: 128 vs 80)
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 40960
  attention_bias: bool = False
  tie_word_embeddings: bool = True   # only says whether a CausalLM file carries lm_head.weight

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
      v = getattr(self, f)
      _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f,
             f"{v!r} must be a positive integer")
    _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
           f"{self.num_key_value_heads} does not divide num_attention_heads "
           f"{self.num_attention_heads}")
    _check(self.head_dim % 2 == 0, "head_dim", f"{self.head_dim} must be even (rotate-half RoPE)")
    _check(self.rms_norm_eps > 0, "rms_norm_eps", f"{self.rms_norm_eps} must be > 0")
    _check(self.rope_theta > 0, "rope_theta", f"{self.rope_theta} must be > 0")
    for f in ("attention_bias", "tie_word_embeddings"):
      _check(isinstance(getattr(self, f), bool), f, f"{getattr(self, f)!r} must be true/false")

  @classmethod
  def from_hf_config(cls, d: dict, where: str = "Qwen3 config") -> "Qwen3Config":
    """From a transformers ``config.json`` dict; unsupported settings raise naming the field.

    ``attention_dropout`` is ignored (training-only in transformers; the encoder is evaluated),
    and so are metadata fields (token ids, ``torch_dtype``, ``use_cache``...)."""
    d = {**HF_DEFAULTS, **{k: v for k, v in d.items() if k != "rope_theta" or v is not None}}
    _check(d.get("model_type", "qwen3") == "qwen3", "model_type",
           f"{d.get('model_type')!r} is not 'qwen3'", where)
    _check(d["hidden_act"] == "silu", "hidden_act", f"{d['hidden_act']!r} unsupported (silu)", where)
    heads = d["num_attention_heads"]
    kv = heads if d["num_key_value_heads"] is None else d["num_key_value_heads"]
    _check(d["head_dim"] is not None, "head_dim", "null is not supported; give the head size", where)
    _check_no_sliding_window(d, where)
    prf = d.get("partial_rotary_factor")
    _check(prf in (None, 1, 1.0), "partial_rotary_factor", f"{prf!r} unsupported (full rotary)",
           where)
    theta = _rope_theta(d, where)
    try:
      return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                 intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                 num_attention_heads=heads, num_key_value_heads=kv, head_dim=d["head_dim"],
                 rms_norm_eps=float(d["rms_norm_eps"]), rope_theta=theta,
                 max_position_embeddings=d["max_position_embeddings"],
                 attention_bias=d["attention_bias"], tie_word_embeddings=d["tie_word_embeddings"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


def _rope_theta(d: dict, where: str) -> float:
  """transformers' precedence: a non-empty ``rope_scaling`` replaces ``rope_parameters``; its own
  ``rope_theta`` beats the top-level one. Only the default (unscaled) rope is supported."""
  field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
  params = d.get(field) or {}
  _check(isinstance(params, dict), field, f"{params!r} must be a dict", where)
  rope_type = params.get("rope_type", params.get("type", "default"))
  _check(rope_type == "default", f"{field}.rope_type",
         f"{rope_type!r} unsupported; only the default rope (no scaling) is implemented", where)
  extra = sorted(set(params) - set(_ROPE_KEYS))
  if extra:
    _check(False, f"{field}.{extra[0]}", f"unsupported rope setting(s) {extra} (only "
           f"{_ROPE_KEYS})", where)
  return float(params.get("rope_theta", d["rope_theta"]))


def _check_no_sliding_window(d: dict, where: str):
  """Refuse every layer that transformers would run with sliding-window attention."""
  layers = d["num_hidden_layers"]
  types = d.get("layer_types")
  if types is not None:
    _check(len(types) == layers, "layer_types",
           f"{len(types)} entries for num_hidden_layers {layers}", where)
    bad = [i for i, t in enumerate(types) if t not in FULL_ATTENTION_TYPES]
    if bad:
      _check(False, "layer_types", f"layers {bad} are {types[bad[0]]!r}; only full (causal) "
             "attention is supported, not sliding-window attention", where)
  elif d["use_sliding_window"] and d["sliding_window"] is not None:
    sliding = [i for i in range(layers) if i >= d["max_window_layers"]]
    _check(not sliding, "use_sliding_window",
           f"true makes layers {sliding} sliding-window attention (max_window_layers "
           f"{d['max_window_layers']}); sliding-window attention is not supported", where)


def rope_tables(cfg: Qwen3Config, length: int, dtype):
  """(cos, sin) [L, head_dim] for positions 0..L-1, built in float32 as transformers does."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, L, H, D]; rotate-half convention: x * cos + cat(-x2, x1) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


class Attention(nnx.Module):
  def __init__(self, cfg: Qwen3Config, *, opts: RuntimeOptions, rngs):
    h, kv, d, w = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    b = cfg.attention_bias
    self.q_proj = dense(w, h * d, axes=("embed", "heads"), use_bias=b, rngs=rngs, **opts.kw)
    self.k_proj = dense(w, kv * d, axes=("embed", "heads"), use_bias=b, rngs=rngs, **opts.kw)
    self.v_proj = dense(w, kv * d, axes=("embed", "heads"), use_bias=b, rngs=rngs, **opts.kw)
    self.o_proj = dense(h * d, w, axes=("heads", "embed"), use_bias=b, rngs=rngs, **opts.kw)
    self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **opts.kw)   # over head_dim, per head
    self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **opts.kw)
    self.heads, self.kv_heads, self.head_dim, self.attention = h, kv, d, opts.attention

  def __call__(self, x, cos, sin, keep):
    b, t, _ = x.shape
    q = self.q_norm(self.q_proj(x).reshape(b, t, self.heads, self.head_dim))
    k = self.k_norm(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim))
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = self.heads // self.kv_heads   # transformers' repeat_kv: kv head j serves q heads j*rep..
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    o = dot_product_attention(q, k, v, implementation=self.attention, causal=True, mask=keep)
    return self.o_proj(o.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: Qwen3Config, *, opts: RuntimeOptions, rngs):
    w, m = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = dense(w, m, axes=("embed", "mlp"), use_bias=False, rngs=rngs, **opts.kw)
    self.up_proj = dense(w, m, axes=("embed", "mlp"), use_bias=False, rngs=rngs, **opts.kw)
    self.down_proj = dense(m, w, axes=("mlp", "embed"), use_bias=False, rngs=rngs, **opts.kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

  def __init__(self, cfg: Qwen3Config, *, opts: RuntimeOptions, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **opts.kw)
    self.self_attn = Attention(cfg, opts=opts, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **opts.kw)
    self.mlp = MLP(cfg, opts=opts, rngs=rngs)

  def __call__(self, x, cos, sin, keep):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, keep)
    return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(layer, x, cos, sin, keep):
  return layer(x, cos, sin, keep)


class Qwen3TextEncoder(nnx.Module):
  """``(input_ids [B, L] int, attention_mask [B, L] (1 = real token)) -> hidden states``.

  Returns ``num_hidden_layers + 1`` arrays [B, L, hidden]: the token embeddings, then each
  layer's output, the last with the final ``norm`` applied; ``[-2]`` is what Z-Image uses.
  Positions are 0..L-1 as in transformers without ``position_ids``, so right-padded batches give
  real tokens the same values as unpadded ones; values at padded positions are meaningless.
  """

  def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    opts = RuntimeOptions(dtype, param_dtype, attention, remat)
    if attention == "splash":
      raise ValueError("attention implementation 'splash' has no causal path (Qwen3 attends "
                       "causally); choose 'xla', 'jax' or 'cudnn'")
    self.config, self.remat = cfg, remat
    self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **opts.kw)
    self.layers = nnx.List([DecoderLayer(cfg, opts=opts, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **opts.kw)

  def __call__(self, input_ids, attention_mask) -> tuple:
    ids, mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"Qwen3 input_ids must be integer [batch, seq], got {ids.dtype}{ids.shape}")
    if mask.shape != ids.shape:
      raise ValueError(f"Qwen3 attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    x = self.embed_tokens(ids)
    cos, sin = rope_tables(self.config, ids.shape[1], x.dtype)
    keep = (mask != 0)[:, None, None, :]          # [B, 1, 1, L]: padded keys are never attended
    run = maybe_remat(_run_layer, self.remat)
    hidden = [x]
    for layer in self.layers:
      x = run(layer, x, cos, sin, keep)
      hidden.append(x)
    hidden[-1] = self.norm(x)
    return tuple(hidden)
