"""Explicit weight table: diffusers ``ZImageTransformer2DModel`` <-> ``zimage.py``.

Our blocks are stacked (one parameter per tensor kind with a leading layer axis) while diffusers
stores ``<stack>.{i}.<suffix>``; the rules name the stacked sources ``<stack>.*.<suffix>`` that
``didr_jax.weights.stacking.stack_layers`` builds lazily from the per-layer keys
(``diffusers_loading`` does it on load, and splits them back on export).
"""
from __future__ import annotations

from didr_jax.models.zimage import ZImageConfig
from didr_jax.weights import Rule

STACKS = ("noise_refiner", "context_refiner", "layers")
MODULATED = {"noise_refiner": True, "context_refiner": False, "layers": True}


def _linear(tgt, src, bias=True, transform="linear"):
  rules = [Rule(f"{tgt}.kernel", f"{src}.weight", transform)]
  return rules + ([Rule(f"{tgt}.bias", f"{src}.bias")] if bias else [])


def block_suffixes(modulation: bool, qk_norm: bool) -> list[tuple[str, str, str]]:
  """(flax suffix, torch suffix, transform) of one block's parameters."""
  out = [(f"attention.{n}.kernel", f"attention.{n}.weight", "stacked_linear")
         for n in ("to_q", "to_k", "to_v")]
  out.append(("attention.to_out.kernel", "attention.to_out.0.weight", "stacked_linear"))
  if qk_norm:
    out += [(f"attention.{n}.scale", f"attention.{n}.weight", "none") for n in ("norm_q", "norm_k")]
  out += [(f"feed_forward.{n}.kernel", f"feed_forward.{n}.weight", "stacked_linear")
          for n in ("w1", "w2", "w3")]
  out += [(f"{n}.scale", f"{n}.weight", "none")
          for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")]
  if modulation:
    out += [("adaLN_modulation.kernel", "adaLN_modulation.0.weight", "stacked_linear"),
            ("adaLN_modulation.bias", "adaLN_modulation.0.bias", "none")]
  return out


def zimage_rules(cfg: ZImageConfig) -> list[Rule]:
  """The whole table; stacked sources are ``<stack>.*.<suffix>`` (see :func:`stack_layers`)."""
  pf = f"{cfg.patch_size}-{cfg.f_patch_size}"
  rules = _linear("x_embedder", f"all_x_embedder.{pf}")
  rules += _linear("t_linear_1", "t_embedder.mlp.0") + _linear("t_linear_2", "t_embedder.mlp.2")
  rules += [Rule("cap_norm.scale", "cap_embedder.0.weight")]
  rules += _linear("cap_linear", "cap_embedder.1")
  rules += [Rule("x_pad_token", "x_pad_token"), Rule("cap_pad_token", "cap_pad_token")]
  rules += _linear("final_adaLN", f"all_final_layer.{pf}.adaLN_modulation.1")
  rules += _linear("final_linear", f"all_final_layer.{pf}.linear")
  for stack in STACKS:
    if (cfg.n_layers if stack == "layers" else cfg.n_refiner_layers) == 0:
      continue
    rules += [Rule(f"{stack}.{f}", f"{stack}.*.{s}", tr)
              for f, s, tr in block_suffixes(MODULATED[stack], cfg.qk_norm)]
  return rules


def stacked_layers(cfg: ZImageConfig) -> dict:
  """{stack: (layers, the block's torch suffixes)}: what ``weights.stacking`` stacks on load."""
  return {stack: (cfg.n_layers if stack == "layers" else cfg.n_refiner_layers,
                  {s for _, s, _ in block_suffixes(MODULATED[stack], True)}) for stack in STACKS}
