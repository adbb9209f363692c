"""Explicit weight table: diffusers ``ZImageTransformer2DModel`` <-> ``zimage.py``.

Our blocks are stacked (one parameter per tensor kind with a leading layer axis) while diffusers
stores ``layers.{i}.<suffix>``. :func:`stack_layers` turns the per-layer keys into stacked keys
``layers.*.<suffix>`` (torch layout, ``[n, ...]``) *lazily*, so ``load_state`` still reads only
each device's slice; a layer key that is missing or mis-shaped is reported by its own name, and
unknown keys are left for ``load_state`` to report as unused. :func:`unstack_layers` undoes it on
export.

To register in ``diffusers_loading.KINDS``: ``ModelKind(ZImageConfig, ZImageTransformer2DModel,
zimage_rules, stack_layers)``; its ``to_diffusers`` would also need :func:`unstack_layers`.
"""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from didr_jax.weights import (Rule, WeightMismatchError, export_state, load_state,
                              read_weights_folder, write_safetensors)

WEIGHTS_STEM = "diffusion_pytorch_model"
STACKS = ("noise_refiner", "context_refiner", "layers")
MODULATED = {"noise_refiner": True, "context_refiner": False, "layers": True}
_LAYER_KEY = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.(.+)$")

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


class LazyStack:
  """``np.stack(parts)`` (optionally with axes 1, 2 swapped) that only reads what is indexed."""

  def __init__(self, parts, swap: bool = False):
    self.parts, self.swap = parts, swap
    s = parts[0].shape
    self.shape = (len(parts),) + ((s[1], s[0]) + tuple(s[2:]) if swap else tuple(s))
    self.dtype = parts[0].dtype

  def transpose(self, *axes):
    if tuple(axes) != (0, 2, 1):
      raise ValueError(f"LazyStack supports only transpose(0, 2, 1), got {axes}")
    return LazyStack(self.parts, not self.swap)

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    first, rest = idx[0], idx[1:]
    picked = self.parts[first] if isinstance(first, slice) else [self.parts[first]]
    rows = [np.asarray(p).T[rest] if self.swap else np.asarray(p)[rest] for p in picked]
    out = np.stack(rows)
    return out if isinstance(first, slice) else out[0]

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def stack_layers(tensors: dict) -> dict:
  """Per-layer keys ``<stack>.{i}.<suffix>`` -> lazy ``<stack>.*.<suffix>`` [n, ...].

  Only the block's known suffixes are stacked; the layer count of a stack is the largest index
  seen + 1. A gap or a shape differing from layer 0 raises, naming the key; anything else is
  passed through for ``load_state`` to judge (so a wrong layer count shows as a mis-shaped
  stacked key, an unknown suffix as an unused key).
  """
  known = {stack: {s for _, s, _ in block_suffixes(MODULATED[stack], True)} for stack in STACKS}
  groups: dict[tuple[str, str], dict[int, str]] = {}
  out = {}
  for key, value in tensors.items():
    m = _LAYER_KEY.match(key)
    if m and m.group(3) in known[m.group(1)]:
      groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = key
    else:
      out[key] = value
  counts = {}
  for (stack, _), idx in groups.items():
    counts[stack] = max(counts.get(stack, 0), max(idx) + 1)
  missing, misshaped = [], []
  for (stack, suffix), idx in sorted(groups.items()):
    keys = [f"{stack}.{i}.{suffix}" for i in range(counts[stack])]
    missing += [k for k in keys if k not in tensors]
    present = [k for k in keys if k in tensors]
    ref = tuple(tensors[present[0]].shape)
    misshaped += [f"{k}: {tuple(tensors[k].shape)} != {present[0]} {ref}" for k in present
                  if tuple(tensors[k].shape) != ref]
    if len(present) == len(keys):
      out[f"{stack}.*.{suffix}"] = LazyStack([tensors[k] for k in keys])
  if missing or misshaped:
    parts = ["ZImage weights do not match the model"]
    if missing:
      parts.append(f"  keys missing from the weights ({len(missing)}): " + ", ".join(missing[:40]))
    unused = sorted(k for k in out if _LAYER_KEY.match(k))
    if unused:
      parts.append(f"  unused layer keys ({len(unused)}): " + ", ".join(unused[:40]))
    if misshaped:
      parts.append(f"  mis-shaped keys ({len(misshaped)}): " + ", ".join(misshaped[:40]))
    raise WeightMismatchError("\n".join(parts))
  return out


def unstack_layers(tensors: dict) -> dict:
  """Inverse of :func:`stack_layers` for exported host arrays."""
  out = {}
  for key, value in tensors.items():
    stack, star, suffix = key.partition(".*.")
    if star:
      for i in range(value.shape[0]):
        out[f"{stack}.{i}.{suffix}"] = np.ascontiguousarray(value[i])
    else:
      out[key] = value
  return out


def from_diffusers_zimage(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                          rules=None, attention: str = "xla",
                          remat: str = "none") -> ZImageTransformer2DModel:
  """A diffusers ``transformer/`` folder (config.json + single or sharded safetensors) as our
  model, each parameter placed from the memory-mapped file with its target sharding."""
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs, read_config
  config = read_config(folder)
  if config.get("_class_name") != "ZImageTransformer2DModel":
    raise ValueError(f"{folder}: _class_name {config.get('_class_name')!r} is not "
                     "'ZImageTransformer2DModel'")
  cfg = ZImageConfig.from_dict(config)
  mesh = shd.single_device_mesh() if mesh is None else mesh
  rules = "replicated" if rules is None else rules
  rules = shd.get_rules(rules) if isinstance(rules, str) else rules
  make = lambda: ZImageTransformer2DModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                          attention=attention, remat=remat, rngs=ShapeOnlyRngs())
  graphdef, abs_state = shd.abstract_model(make, mesh, rules)
  tensors = stack_layers(read_weights_folder(folder, WEIGHTS_STEM))
  state = load_state(abs_state, tensors, zimage_rules(cfg), what=folder)
  with shd.model_context(mesh, rules):
    return nnx.merge(graphdef, state)


def to_diffusers_zimage(model: ZImageTransformer2DModel, folder: str, *, dtype=np.float32) -> str:
  """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers loads."""
  tensors = export_state(nnx.state(model, nnx.Param), zimage_rules(model.config), dtype=dtype)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{WEIGHTS_STEM}.safetensors")
  write_safetensors(path, unstack_layers(tensors), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2)
  return path
