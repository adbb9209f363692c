"""Explicit weight table from a transformers Qwen3 folder into ``qwen3.py``'s text encoder.

Two namings of one decoder stack, both accepted explicitly:

* ``Qwen3ForCausalLM`` (Qwen3-4B, Z-Image's ``text_encoder/``): every key under ``model.``, plus
  ``lm_head.weight`` when the embeddings are not tied;
* ``Qwen3Model`` (what ``AutoModel`` saves): the same keys without the prefix.

``lm_head.weight`` is dropped by name (:data:`IGNORED_KEYS`): an encoder never computes logits,
and with ``tie_word_embeddings`` it is the embedding matrix anyway. The rotary ``inv_freq``
buffers are non-persistent and never in a file. Anything else that does not match the table is
reported by ``load_state``'s :class:`~didr_jax.weights.WeightMismatchError`, naming the key.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from didr_jax.models.clip_loading import (CheckpointArchitectureError, materialise,
                                          read_config_json)
from didr_jax.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from didr_jax.weights import Rule, read_weights_folder

CAUSAL_LM_PREFIX = "model."
IGNORED_KEYS = ("lm_head.weight",)
ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3Model")


def _linear(tgt, src, bias):
  rules = [Rule(f"{tgt}.kernel", f"{src}.weight", "linear")]
  return rules + ([Rule(f"{tgt}.bias", f"{src}.bias")] if bias else [])


def _norm(tgt, src):
  return [Rule(f"{tgt}.scale", f"{src}.weight")]


def qwen3_rules(cfg: Qwen3Config, *, src: str = CAUSAL_LM_PREFIX, tgt: str = "") -> list[Rule]:
  """The whole table; ``src`` is 'model.' (Qwen3ForCausalLM files) or '' (Qwen3Model files)."""
  rules = [Rule(f"{tgt}embed_tokens.embedding", f"{src}embed_tokens.weight")]
  for i in range(cfg.num_hidden_layers):
    t, s = f"{tgt}layers.{i}", f"{src}layers.{i}"
    rules += _norm(f"{t}.input_layernorm", f"{s}.input_layernorm")
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
      rules += _linear(f"{t}.self_attn.{p}", f"{s}.self_attn.{p}", cfg.attention_bias)
    rules += _norm(f"{t}.self_attn.q_norm", f"{s}.self_attn.q_norm")
    rules += _norm(f"{t}.self_attn.k_norm", f"{s}.self_attn.k_norm")
    rules += _norm(f"{t}.post_attention_layernorm", f"{s}.post_attention_layernorm")
    for p in ("gate_proj", "up_proj", "down_proj"):
      rules += _linear(f"{t}.mlp.{p}", f"{s}.mlp.{p}", False)
  return rules + _norm(f"{tgt}norm", f"{src}norm")


def source_prefix(tensors) -> str:
  """'model.' when the file uses Qwen3ForCausalLM naming (Qwen3Model files have no key under
  'model.'), '' otherwise; keys of the other naming are then reported as unused."""
  return CAUSAL_LM_PREFIX if any(k.startswith(CAUSAL_LM_PREFIX) for k in tensors) else ""


def drop_ignored(tensors: dict) -> dict:
  return {k: v for k, v in tensors.items() if k not in IGNORED_KEYS}


def from_transformers_qwen3(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                            rules=None, attention: str = "xla",
                            remat: str = "none") -> Qwen3TextEncoder:
  """A transformers Qwen3 folder (config.json + model.safetensors or its sharded index) as our
  text encoder, each parameter placed straight from the memory-mapped file with its sharding."""
  d = read_config_json(folder)
  where = os.path.join(folder, "config.json")
  archs = d.get("architectures") or []
  if archs and archs[0] not in ARCHITECTURES:
    raise CheckpointArchitectureError(
        f"{where}: architecture {archs[0]!r} is not a Qwen3 decoder; expected one of {ARCHITECTURES}")
  cfg = Qwen3Config.from_hf_config(d, where)
  tensors = drop_ignored(read_weights_folder(folder, "model"))
  table = qwen3_rules(cfg, src=source_prefix(tensors))
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  return materialise(lambda: Qwen3TextEncoder(cfg, rngs=nnx.Rngs(0), **kw), tensors, table,
                     folder, mesh, rules)
