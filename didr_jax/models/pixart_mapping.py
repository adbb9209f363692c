"""Explicit mapping table: diffusers ``PixArtTransformer2DModel`` state dict <-> our NNX state.

The blocks' parameters are stacked along a leading layer axis, so each per-layer diffusers key
maps into ONE SLICE of a stacked parameter: such a rule's target ends in ``[i]``
(``transformer_blocks.attn1.to_q.kernel[3]`` <- ``transformer_blocks.3.attn1.to_q.weight``).
``load_state``/``export_state`` only know whole parameters, so :func:`load_pixart_state` first
checks every per-layer key itself (missing, unused and mis-shaped keys raise
``WeightMismatchError`` naming the diffusers key), then hands ``load_state`` one lazily stacked
tensor per stacked parameter: a device reads only the layers of its own shard.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from didr_jax.weights import (
    TRANSFORMS, Rule, WeightFileError, WeightMismatchError, export_state, flat_state, load_state,
    read_weights_folder, write_safetensors)

WEIGHTS_STEM = "diffusion_pytorch_model"
_SLICE = re.compile(r"^(.*)\[(\d+)\]$")


def pixart_rules(cfg: PixArtConfig) -> list[Rule]:
  """Every parameter (per-layer slices of the stacked blocks included) with its diffusers key."""
  rules: list[Rule] = []

  def linear(flax: str, torch: str | None = None, *, bias: bool = True, layer=None,
             transform: str = "linear"):
    torch = torch or flax
    idx = "" if layer is None else f"[{layer}]"
    rules.append(Rule(f"{flax}.kernel{idx}", f"{torch}.weight", transform))
    if bias:
      rules.append(Rule(f"{flax}.bias{idx}", f"{torch}.bias"))

  linear("pos_embed.proj", transform="conv")
  embedders = ["timestep_embedder"]
  if cfg.additional_conditions:
    embedders += ["resolution_embedder", "aspect_ratio_embedder"]
  for e in embedders:
    for n in ("linear_1", "linear_2"):
      linear(f"adaln_single.emb.{e}.{n}")
  linear("adaln_single.linear")
  if cfg.caption_channels is not None:
    linear("caption_projection.linear_1")
    linear("caption_projection.linear_2")
  for i in range(cfg.num_layers):
    b, t = "transformer_blocks", f"transformer_blocks.{i}"
    rules.append(Rule(f"{b}.scale_shift_table[{i}]", f"{t}.scale_shift_table"))
    for a in ("attn1", "attn2"):
      for n in ("to_q", "to_k", "to_v"):
        linear(f"{b}.{a}.{n}", f"{t}.{a}.{n}", bias=cfg.attention_bias, layer=i)
      linear(f"{b}.{a}.to_out.0", f"{t}.{a}.to_out.0", layer=i)
    linear(f"{b}.ff_proj", f"{t}.ff.net.0.proj", layer=i)
    linear(f"{b}.ff_out", f"{t}.ff.net.2", layer=i)
  rules.append(Rule("scale_shift_table", "scale_shift_table"))
  linear("proj_out")
  return rules


class _LazyStack:
  """Per-layer tensors seen as one [L, ...] array; indexing reads only the requested layers."""

  def __init__(self, parts, to_flax, shape, dtype):
    self.parts, self.to_flax, self.shape, self.dtype = parts, to_flax, tuple(shape), dtype

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    layers = range(len(self.parts))[idx[0]] if idx else range(len(self.parts))
    return np.stack([np.asarray(self.to_flax(self.parts[i]))[idx[1:]] for i in layers])


def _split(target: str):
  m = _SLICE.match(target)
  return (m.group(1), int(m.group(2))) if m else (target, None)


def stack_for_load(abstract_state, tensors, rules, *, what: str):
  """(whole-parameter rules, tensors) for ``load_state``; raises naming every bad diffusers key."""
  flat = {k: (v.get_value() if isinstance(v, nnx.Variable) else v)
          for k, v in flat_state(abstract_state).items()}
  bad = [r for r in rules if r.transform not in TRANSFORMS]
  if bad:
    raise WeightMismatchError(f"{what}: unknown transform(s) {sorted({r.transform for r in bad})}")
  covered, groups, problems = {}, {}, {"missing": [], "misshaped": [], "unknown": []}
  for r in rules:
    base, layer = _split(r.target)
    if base not in flat:
      problems["unknown"].append(r.target)
      continue
    want = flat[base].shape if layer is None else flat[base].shape[1:]
    covered.setdefault(base, set()).add(layer)
    if layer is not None:
      groups.setdefault(base, {})[layer] = r
    if r.source not in tensors:
      problems["missing"].append(r.source)
    elif TRANSFORMS[r.transform].to_flax(tensors[r.source]).shape != tuple(want):
      torch_want = TRANSFORMS[r.transform].to_torch(np.broadcast_to(np.float32(0), want)).shape
      problems["misshaped"].append(
          f"{r.source}: {tuple(tensors[r.source].shape)} -> {tuple(torch_want)}")
  no_rule = sorted(k for k in flat if k not in covered or (
      None not in covered[k] and covered[k] != set(range(flat[k].shape[0]))))
  unused = sorted(set(tensors) - {r.source for r in rules})
  if any(problems.values()) or no_rule or unused:
    parts = [f"{what}: weights do not match the model"]
    for title, items in (("model parameters with no (or incomplete) mapping rules", no_rule),
                         ("table names unknown parameters", problems["unknown"]),
                         ("keys missing from the weights", sorted(problems["missing"])),
                         ("unused keys in the weights", unused),
                         ("mis-shaped keys (key: file shape -> expected)",
                          sorted(problems["misshaped"]))):
      if items:
        parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:40])
                     + (" ..." if len(items) > 40 else ""))
    raise WeightMismatchError("\n".join(parts))
  out_rules = [r for r in rules if _split(r.target)[1] is None]
  out = {r.source: tensors[r.source] for r in out_rules}
  for base, by_layer in groups.items():
    rs = [by_layer[i] for i in range(len(by_layer))]
    key = rs[0].source.replace(".0.", ".*.", 1)  # e.g. transformer_blocks.*.attn1.to_q.weight
    fn = TRANSFORMS[rs[0].transform].to_flax
    out[key] = _LazyStack([tensors[r.source] for r in rs], fn, flat[base].shape, flat[base].dtype)
    out_rules.append(Rule(base, key))
  return out_rules, out


def load_pixart_state(abstract_state, tensors, rules, *, what: str):
  """``load_state`` for a table whose rules may target ``[i]`` slices of stacked parameters."""
  whole_rules, stacked = stack_for_load(abstract_state, tensors, rules, what=what)
  return load_state(abstract_state, stacked, whole_rules, what=what)


def export_pixart_state(state, rules, *, dtype=np.float32) -> dict[str, np.ndarray]:
  """The inverse: {diffusers key: host array}, stacked parameters split back per layer."""
  whole = [r for r in rules if _split(r.target)[1] is None]
  sliced = [r for r in rules if _split(r.target)[1] is not None]
  bases = sorted({_split(r.target)[0] for r in sliced})
  out = export_state(state, whole + [Rule(b, f"__stacked__{b}") for b in bases], dtype=dtype)
  stacked = {b: out.pop(f"__stacked__{b}") for b in bases}
  for r in sliced:
    base, layer = _split(r.target)
    out[r.source] = np.ascontiguousarray(TRANSFORMS[r.transform].to_torch(stacked[base][layer]))
  return out


class _ShapeOnlyRngs:
  """One fixed key: the abstract model only needs shapes (``diffusers_loading.ShapeOnlyRngs``,
  not imported so that diffusers_loading can later import this module)."""

  def params(self):
    return jax.random.key(0)


def from_diffusers_pixart(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                          rules=None, attention: str = "xla", remat: str = "none"):
  """Load a diffusers PixArt transformer folder (``config.json`` + safetensors) as our model.

  ``rules``: sharding rule table or its name in ``didr_jax.sharding.RULES`` (default replicated).
  """
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise WeightFileError(f"{path}: no config.json; not a diffusers model folder")
  with open(path) as f:
    cfg = PixArtConfig.from_dict(json.load(f))
  mesh = shd.single_device_mesh() if mesh is None else mesh
  if rules is None or isinstance(rules, str):
    rules = shd.get_rules(rules or "replicated")
  graphdef, abs_state = shd.abstract_model(
      lambda: PixArtTransformer2DModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                       attention=attention, remat=remat, rngs=_ShapeOnlyRngs()),
      mesh, rules)
  tensors = read_weights_folder(folder, WEIGHTS_STEM)
  return nnx.merge(graphdef, load_pixart_state(abs_state, tensors, pixart_rules(cfg), what=folder))


def to_diffusers_pixart(model: PixArtTransformer2DModel, folder: str, *, dtype=np.float32) -> str:
  """Write ``config.json`` + ``diffusion_pytorch_model.safetensors``; returns the weights path."""
  tensors = export_pixart_state(nnx.state(model, nnx.Param), pixart_rules(model.config),
                                dtype=dtype)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{WEIGHTS_STEM}.safetensors")
  write_safetensors(path, tensors, metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2)
  return path
