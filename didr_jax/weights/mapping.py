"""Explicit key-mapping tables between PyTorch state dicts and NNX states.

A model's converter is a list of :class:`Rule` (target NNX path <- source key, transform). Loading
checks the whole table in one pass and raises :class:`WeightMismatchError` listing *every* missing,
unused and mis-shaped key; nothing is guessed from ``ndim``. Each parameter is placed with
``jax.make_array_from_callback`` so a device only reads its own slice of the memory-mapped file.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Transform:
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "none": Transform(lambda x: x, lambda x: x),
    # torch Linear (out, in) <-> flax (in, out)
    "linear": Transform(lambda x: x.T, lambda x: x.T),
    # torch Conv2d OIHW <-> flax HWIO
    "conv": Transform(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
    # torch 1x1 Conv2d (O, I, 1, 1) <-> flax Linear (I, O)
    "conv1x1_linear": Transform(lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None]),
    # stacked layers: torch Linear per layer stacked [n, out, in] <-> flax [n, in, out]
    "stacked_linear": Transform(lambda x: x.transpose(0, 2, 1), lambda x: x.transpose(0, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str            # dotted NNX path, e.g. "down_blocks.0.resnets.0.conv1.kernel"
  source: str            # torch state-dict key, e.g. "down_blocks.0.resnets.0.conv1.weight"
  transform: str = "none"


class WeightMismatchError(ValueError):
  """The weights and the model disagree; the message lists every offending key."""


def path_str(path) -> str:
  return ".".join(str(p) for p in path)


def flat_state(state) -> dict[str, object]:
  """{dotted path: leaf} of an nnx.State (leaves: arrays or ShapeDtypeStructs)."""
  return {path_str(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _check_rules(rules: Sequence[Rule], what: str):
  bad = [r for r in rules if r.transform not in TRANSFORMS]
  if bad:
    raise WeightMismatchError(f"{what}: unknown transform(s) {sorted({r.transform for r in bad})}")
  targets = [r.target for r in rules]
  dup = sorted({t for t in targets if targets.count(t) > 1})
  if dup:
    raise WeightMismatchError(f"{what}: mapping table maps these targets twice: {dup[:10]}")


def leaf_value(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _format(what, missing_targets, missing_sources, unused, misshaped) -> str:
  parts = [f"{what}: weights do not match the model"]
  for title, items in (("model parameters with no mapping rule", missing_targets),
                       ("keys missing from the weights", missing_sources),
                       ("unused keys in the weights", unused),
                       ("mis-shaped keys (key: file shape -> expected)", misshaped)):
    if items:
      parts.append(f"  {title} ({len(items)}): " + ", ".join(items[:40])
                   + (" ..." if len(items) > 40 else ""))
  return "\n".join(parts)


def load_state(abstract_state, tensors: Mapping[str, np.ndarray], rules: Sequence[Rule], *,
               what: str):
  """Fill an abstract nnx.State (ShapeDtypeStruct leaves with shardings) from ``tensors``.

  ``what`` names the file or folder in error messages.
  """
  _check_rules(rules, what)
  flat = flat_state(abstract_state)
  by_target = {r.target: r for r in rules}
  missing_targets = sorted(set(flat) - set(by_target))
  unknown_targets = sorted(set(by_target) - set(flat))
  missing_sources = sorted(r.source for r in rules if r.source not in tensors)
  unused = sorted(set(tensors) - {r.source for r in rules})
  misshaped = []
  for target, rule in by_target.items():
    if target in flat and rule.source in tensors:
      got = TRANSFORMS[rule.transform].to_flax(tensors[rule.source]).shape
      want = leaf_value(flat[target]).shape
      if tuple(got) != tuple(want):
        misshaped.append(f"{rule.source}: {tuple(tensors[rule.source].shape)} -> {tuple(want)}")
  if unknown_targets:
    missing_targets += [f"(table names unknown parameter {t})" for t in unknown_targets]
  if missing_targets or missing_sources or unused or misshaped:
    raise WeightMismatchError(_format(what, missing_targets, missing_sources, unused, sorted(misshaped)))

  def place(path, leaf):
    key = path_str(path)
    spec = leaf_value(leaf)
    rule = by_target[key]
    host = TRANSFORMS[rule.transform].to_flax(tensors[rule.source])
    return jax.make_array_from_callback(
        spec.shape, spec.sharding, lambda idx: np.asarray(host[idx], dtype=spec.dtype))

  return nnx.map_state(place, abstract_state)


def export_state(state, rules: Sequence[Rule], *, dtype=np.float32) -> dict[str, np.ndarray]:
  """The inverse of :func:`load_state`: {torch key: host array} for every parameter."""
  _check_rules(rules, "export")
  flat = flat_state(state)
  by_target = {r.target: r for r in rules}
  missing = sorted(set(flat) - set(by_target))
  unknown = sorted(set(by_target) - set(flat))
  if missing or unknown:
    raise WeightMismatchError(_format("export", missing + unknown, [], [], []))
  out = {}
  for target, leaf in flat.items():
    rule = by_target[target]
    host = np.asarray(jax.device_get(leaf_value(leaf)), dtype=dtype)
    out[rule.source] = np.ascontiguousarray(TRANSFORMS[rule.transform].to_torch(host))
  return out
