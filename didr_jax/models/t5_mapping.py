"""The explicit weight table from transformers' T5 encoder checkpoints into ``t5.py``'s tree, and
the folder loader.

Source keys are transformers' (``T5EncoderModel`` state dict); every rule is written out. Two
naming facts are handled by name, before ``load_state`` checks the rest:

* the embedding is tied: ``encoder.embed_tokens.weight`` is an alias of ``shared.weight``.
  transformers 5 writes only ``shared.weight``; other writers may store both names or only the
  alias. Both present must be equal (else ``WeightMismatchError`` names the two keys); the alias is
  then dropped.
* a full ``T5ForConditionalGeneration`` / ``T5Model`` folder (e.g. google/t5-v1_1-xxl itself) also
  holds the decoder: every ``decoder.*`` key and ``lm_head.weight`` is ignored, explicitly, as
  transformers' ``T5EncoderModel`` does (``_keys_to_ignore_on_load_unexpected = [r"decoder"]``).

Any other missing, unused or mis-shaped key raises ``WeightMismatchError`` naming it.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.models.clip_loading import CheckpointArchitectureError, materialise, read_config_json
from didr_jax.models.t5 import T5EncoderConfig, T5EncoderModel
from didr_jax.weights import read_weights_folder
from didr_jax.weights.mapping import Rule, WeightMismatchError, export_state

EMBEDDING_KEY = "shared.weight"
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"
RELATIVE_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
IGNORED_PREFIXES = ("decoder.",)
IGNORED_KEYS = ("lm_head.weight",)
HF_ARCHITECTURES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")


def t5_encoder_rules(cfg: T5EncoderConfig) -> list[Rule]:
  """transformers ``T5EncoderModel`` keys -> our parameters (Linear: (out, in) -> (in, out))."""
  rules = [Rule("shared.embedding", EMBEDDING_KEY),
           Rule("relative_attention_bias", RELATIVE_BIAS_KEY)]  # [buckets, heads]
  for i in range(cfg.num_layers):
    t, s = f"block.{i}", f"encoder.block.{i}"
    rules.append(Rule(f"{t}.attention_norm.scale", f"{s}.layer.0.layer_norm.weight"))
    rules += [Rule(f"{t}.attention.{p}.kernel", f"{s}.layer.0.SelfAttention.{p}.weight", "linear")
              for p in ("q", "k", "v", "o")]
    rules.append(Rule(f"{t}.ff_norm.scale", f"{s}.layer.1.layer_norm.weight"))
    rules += [Rule(f"{t}.ff.{p}.kernel", f"{s}.layer.1.DenseReluDense.{p}.weight", "linear")
              for p in ("wi_0", "wi_1", "wo")]
  rules.append(Rule("final_layer_norm.scale", "encoder.final_layer_norm.weight"))
  return rules


def encoder_tensors(tensors: dict, what: str) -> dict:
  """The encoder's keys only: the embedding alias resolved, decoder keys dropped (see above)."""
  out = {k: v for k, v in tensors.items()
         if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS}
  if EMBEDDING_ALIAS in out:
    alias = out.pop(EMBEDDING_ALIAS)
    if EMBEDDING_KEY not in out:
      out[EMBEDDING_KEY] = alias
    elif out[EMBEDDING_KEY].shape != alias.shape or not np.array_equal(out[EMBEDDING_KEY], alias):
      raise WeightMismatchError(
          f"{what}: tied embedding keys {EMBEDDING_KEY!r} {tuple(out[EMBEDDING_KEY].shape)} and "
          f"{EMBEDDING_ALIAS!r} {tuple(alias.shape)} differ; a T5 encoder has one embedding")
  return out


def from_transformers_t5(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                         rules=None, attention: str = "xla", remat: str = "none") -> T5EncoderModel:
  """A transformers T5 folder (config.json + model.safetensors or sharded with an index) as our
  encoder, each parameter placed with its sharding straight from the memory-mapped file.

  ``mesh`` / ``rules`` (sharding rules, ``didr_jax.sharding.RULES``) as in ``clip_loading``.
  """
  d = read_config_json(folder)
  where = os.path.join(folder, "config.json")
  archs = d.get("architectures") or []
  if archs and archs[0] not in HF_ARCHITECTURES:
    raise CheckpointArchitectureError(
        f"{where}: architecture {archs[0]!r} is not a T5 checkpoint from_transformers_t5 reads; "
        f"expected one of {HF_ARCHITECTURES}")
  cfg = T5EncoderConfig.from_hf_config(d, where)
  tensors = encoder_tensors(read_weights_folder(folder, "model"), folder)
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  return materialise(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0), **kw), tensors,
                     t5_encoder_rules(cfg), folder, mesh, rules)


def to_transformers_t5(model: T5EncoderModel, *, dtype=np.float32) -> dict[str, np.ndarray]:
  """{transformers key: host array}: the inverse of the table (``shared.weight`` only, as
  transformers 5 writes it)."""
  return export_state(nnx.state(model, nnx.Param), t5_encoder_rules(model.config), dtype=dtype)
