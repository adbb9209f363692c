"""LoRA adapters on any model with a diffusers mapping table, and their PEFT/diffusers export.

An adapter on a linear layer with kernel W [in, out] (flax layout) is a pair A [in, r], B [r, out];
the adapted kernel is W + (alpha / r) A B. The DiTs' scanned blocks hold one stacked kernel
[L, in, out] per linear (the table's ``stacked_linear`` rules); their adapters are stacked too,
A [L, in, r], B [L, r, out], one independent adapter per layer, merged layer by layer. Adapters
are a plain pytree ``{kernel path: {"a", "b"}}`` beside the frozen base parameters; :func:`merge`
forms the adapted kernels inside the jitted step (the base under ``stop_gradient``), so one model
class serves base and adapted networks and only the adapters (and their optimizer state) are
trained. B starts at zero: the adapted model equals its base at step 0.

Targets are named as PEFT's ``target_modules``: diffusers module names matched whole or by their
last components (``to_q`` matches ``...attn1.to_q``; a stacked linear's names are its per-layer
ones, ``transformer_blocks.{i}.attn1.to_q``). A stacked linear takes adapters on all its layers or
none: a pattern naming one layer (``transformer_blocks.3.attn1.to_q``) is refused rather than
silently widened to every layer or trained as a masked stack.
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

PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"   # the file diffusers' LoRA loaders look for
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# per diffusers class: (the pipeline component whose name prefixes the PEFT keys, the default
# targets: the blocks' attention projections and feed-forward linears)
_MODELS = {
    "UNet2DConditionModel": ("unet", _ATTENTION + ("ff.net.0.proj", "ff.net.2")),
    "PixArtTransformer2DModel": ("transformer", _ATTENTION + ("ff.net.0.proj", "ff.net.2")),
    "ZImageTransformer2DModel": ("transformer",
                                 _ATTENTION + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")),
}
# rule transforms of the layers adapters fit (1x1 convolutions stored as linears, SD1.5's
# proj_in / proj_out, are not among them: PEFT would need them as convolutions)
_ADAPTABLE = ("linear", "stacked_linear", "conv")


class LoraError(ValueError):
  """A LoRA setting that cannot be applied; the message names the field."""


def _model(class_name: str) -> tuple[str, tuple[str, ...]]:
  if class_name not in _MODELS:
    raise LoraError(f"LoRA: no adapters for {class_name!r}; one of {sorted(_MODELS)}")
  return _MODELS[class_name]


def default_targets(class_name: str) -> tuple[str, ...]:
  """The default ``model.lora.targets`` of a diffusers class: attention and feed-forward."""
  return _model(class_name)[1]


def peft_prefix(class_name: str) -> str:
  """The key prefix diffusers' LoRA loaders expect for the class (``unet`` / ``transformer``)."""
  return _model(class_name)[0]


def _match(module: str, pattern: str) -> str | None:
  """"all" when ``pattern`` names ``module`` (whole, or its last components), "layer" when it
  names one layer of a stacked module (a layer index where the module has ``*``), else None."""
  m, p = module.split("."), pattern.split(".")
  if len(p) > len(m):
    return None
  tail = m[len(m) - len(p):]
  if tail == p:
    return "all"
  if all(a == b or (a == "*" and b.isdigit()) for a, b in zip(tail, p)):
    return "layer"
  return None


def lora_targets(rules, patterns: Sequence[str]) -> dict[str, str]:
  """{flax kernel path: diffusers module name} of the linear (stacked ones as
  ``<stack>.*.<module>``) and convolution layers ``patterns`` name; every pattern must match at
  least one, and none may name a single layer of a stacked one."""
  linear = {r.target: r.source[: -len(".weight")] for r in rules
            if r.transform in _ADAPTABLE and r.source.endswith(".weight")}
  if not patterns:
    raise LoraError("model.lora.targets: empty; name at least one module (e.g. to_q)")
  one_layer = [p for p in patterns if any(_match(m, p) == "layer" for m in linear.values())]
  if one_layer:
    raise LoraError(f"model.lora.targets: {one_layer} name single layers of scanned blocks; "
                    "stacked layers take adapters on all their layers (name the module without "
                    "its layer index, e.g. attn1.to_q)")
  unmatched = [p for p in patterns if not any(_match(m, p) for m in linear.values())]
  if unmatched:
    raise LoraError(f"model.lora.targets: {unmatched} match no linear or convolution layer of "
                    f"the model (diffusers module names, e.g. {list(_ATTENTION)} or conv1)")
  return {t: m for t, m in sorted(linear.items()) if any(_match(m, p) for p in patterns)}


def check_rank(rank: int, alpha: float) -> None:
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise LoraError(f"model.lora.rank: {rank!r}; a non-negative integer (0 = no LoRA)")
  if not alpha > 0:
    raise LoraError(f"model.lora.alpha: {alpha!r}; must be positive")


def init_adapters(params, targets: dict[str, str], rank: int, key) -> dict:
  """{kernel path: {"a": N(0, 1/fan_in), "b": 0}} in float32 for every target: a linear's
  A [..., in, r], B [..., r, out] (``...``: the layer axis of a stacked kernel, independent draws
  per layer); a convolution's (kernel [kh, kw, in, out]) A [kh, kw, in, r], B [r, out], PEFT's
  convolution adapter (a kh x kw convolution to r channels, then a 1x1 one)."""
  flat = {k: leaf_value(v) for k, v in flat_state(params).items()}
  out = {}
  for i, path in enumerate(targets):
    kernel = flat[path]
    if kernel.ndim not in ((3,) if "*" in targets[path] else (2, 4)):
      raise LoraError(f"model.lora.targets: {targets[path]} has a {kernel.ndim}-d kernel "
                      f"{kernel.shape}; adapters fit linear and convolution layers only")
    k = jax.random.fold_in(key, i)
    if kernel.ndim == 4:
      kh, kw, fan_in, fan_out = kernel.shape
      a = jax.random.normal(k, (kh, kw, fan_in, rank), jnp.float32) / np.sqrt(kh * kw * fan_in)
      out[path] = {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}
      continue
    *layers, fan_in, fan_out = kernel.shape
    a = jax.random.normal(k, (*layers, fan_in, rank), jnp.float32)
    out[path] = {"a": a / np.sqrt(fan_in), "b": jnp.zeros((*layers, rank, fan_out), jnp.float32)}
  return out


def merge(params, adapters: dict, scale: float):
  """The base parameters (no gradient) with W + scale A B at every adapted kernel (``@`` batches
  over a stacked kernel's layer axis and a convolution's kh x kw window)."""
  def fn(path, leaf):
    value = jax.lax.stop_gradient(leaf_value(leaf))
    adapter = adapters.get(path_str(path))
    if adapter is None:
      return value
    return value + (scale * (adapter["a"] @ adapter["b"])).astype(value.dtype)
  return nnx.map_state(fn, params)


def peft_state(adapters: dict, targets: dict[str, str], scale: float,
               prefix: str) -> dict[str, np.ndarray]:
  """The adapters as a PEFT-format state dict (``<prefix>.<module>.lora_A.weight`` [r, in],
  ``lora_B.weight`` [out, r]; a convolution's [r, in, kh, kw] and [out, r, 1, 1]; a stacked adapter as one pair per layer, ``*`` replaced by the
  layer index) with the scale folded into B, so a loader's default ``lora_alpha = r`` (scale 1)
  reproduces the merged model. ``prefix``: :func:`peft_prefix` of the model's class."""
  out = {}
  for path, adapter in adapters.items():
    a = np.asarray(jax.device_get(adapter["a"]), np.float32)
    b = np.asarray(jax.device_get(adapter["b"]), np.float32) * np.float32(scale)
    module = targets[path]
    layers = ([(module.replace("*", str(i)), a[i], b[i]) for i in range(a.shape[0])]
              if "*" in module else [(module, a, b)])
    for name, a_l, b_l in layers:
      if a_l.ndim == 4:   # convolution: A as torch OIHW [r, in, kh, kw], B as a 1x1 [out, r, 1, 1]
        a_l, b_l = a_l.transpose(3, 2, 0, 1), b_l.T[:, :, None, None]
      else:
        a_l, b_l = a_l.T, b_l.T
      out[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a_l)
      out[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b_l)
  return out


def save_peft(folder: str, adapters: dict, targets: dict[str, str], scale: float,
              prefix: str) -> str:
  """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights`` /
  ``load_lora_adapter`` format); returns its path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, PEFT_WEIGHTS)
  write_safetensors(path, peft_state(adapters, targets, scale, prefix), metadata={"format": "pt"})
  return path
