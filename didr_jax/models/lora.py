"""LoRA adapters on any model with a diffusers mapping table, and their PEFT/diffusers export.

An adapter on a linear layer with kernel W [in, out] (flax layout) is a pair A [in, r], B [r, out];
the adapted kernel is W + (alpha / r) A B. Adapters are a plain pytree ``{kernel path: {"a", "b"}}``
beside the frozen base parameters; :func:`merge` forms the adapted kernels inside the jitted step
(the base under ``stop_gradient``), so one model class serves base and adapted networks and only
the adapters (and their optimizer state) are trained. B starts at zero: the adapted model equals
its base at step 0. Targets are named as PEFT's ``target_modules``: diffusers module names matched
whole or by their last components (``to_q`` matches ``...attn1.to_q``), and only unstacked
linear layers (the table's ``linear`` rules) take adapters (the DiTs' scanned blocks: not yet).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.weights.mapping import flat_state, leaf_value, path_str
from didr_jax.weights.safetensors_io import write_safetensors

# attention projections and feed-forward of the UNets' transformer blocks (diffusers names)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"   # the file diffusers' LoRA loaders look for


class LoraError(ValueError):
  """A LoRA setting that cannot be applied; the message names the field."""


def _matches(module: str, pattern: str) -> bool:
  return module == pattern or module.endswith("." + pattern)


def lora_targets(rules, patterns: Sequence[str] = DEFAULT_TARGETS) -> dict[str, str]:
  """{flax kernel path: diffusers module name} of the linear layers ``patterns`` name; every
  pattern must match at least one linear layer."""
  linear = {r.target: r.source[: -len(".weight")] for r in rules
            if r.transform == "linear" and r.source.endswith(".weight")}
  if not patterns:
    raise LoraError("model.lora.targets: empty; name at least one module (e.g. to_q)")
  unmatched = [p for p in patterns if not any(_matches(m, p) for m in linear.values())]
  if unmatched:
    raise LoraError(f"model.lora.targets: {unmatched} match no linear layer of the model "
                    f"(diffusers module names, e.g. {list(DEFAULT_TARGETS)})")
  return {t: m for t, m in sorted(linear.items()) if any(_matches(m, p) for p in patterns)}


def check_rank(rank: int, alpha: float) -> None:
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise LoraError(f"model.lora.rank: {rank!r}; a non-negative integer (0 = no LoRA)")
  if not alpha > 0:
    raise LoraError(f"model.lora.alpha: {alpha!r}; must be positive")


def init_adapters(params, targets: dict[str, str], rank: int, key) -> dict:
  """{kernel path: {"a": N(0, 1/in) [in, r], "b": 0 [r, out]}} in float32 for every target."""
  flat = {k: leaf_value(v) for k, v in flat_state(params).items()}
  out = {}
  for i, path in enumerate(targets):
    kernel = flat[path]
    if kernel.ndim != 2:
      raise LoraError(f"model.lora.targets: {targets[path]} has a {kernel.ndim}-d kernel "
                      f"{kernel.shape}; adapters fit linear layers only")
    fan_in, fan_out = kernel.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / np.sqrt(fan_in)
    out[path] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
  return out


def merge(params, adapters: dict, scale: float):
  """The base parameters (no gradient) with W + scale A B at every adapted kernel."""
  def fn(path, leaf):
    value = jax.lax.stop_gradient(leaf_value(leaf))
    adapter = adapters.get(path_str(path))
    if adapter is None:
      return value
    return value + (scale * (adapter["a"] @ adapter["b"])).astype(value.dtype)
  return nnx.map_state(fn, params)


def peft_state(adapters: dict, targets: dict[str, str], scale: float,
               prefix: str = "unet") -> dict[str, np.ndarray]:
  """The adapters as a PEFT-format state dict (``<prefix>.<module>.lora_A.weight`` [r, in],
  ``lora_B.weight`` [out, r]) with the scale folded into B, so a loader's default
  ``lora_alpha = r`` (scale 1) reproduces the merged model."""
  out = {}
  for path, adapter in adapters.items():
    module = f"{prefix}.{targets[path]}"
    a = np.asarray(jax.device_get(adapter["a"]), np.float32)
    b = np.asarray(jax.device_get(adapter["b"]), np.float32) * np.float32(scale)
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return out


def save_peft(folder: str, adapters: dict, targets: dict[str, str], scale: float,
              prefix: str = "unet") -> str:
  """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights`` /
  ``load_lora_adapter`` format); returns its path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, PEFT_WEIGHTS)
  write_safetensors(path, peft_state(adapters, targets, scale, prefix), metadata={"format": "pt"})
  return path
