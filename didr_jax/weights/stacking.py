"""Per-layer checkpoint keys <-> the stacked parameters of scanned blocks (the DiTs).

Our repeated blocks are stacked (one parameter per tensor kind with a leading layer axis, scanned
over) while diffusers stores ``<stack>.{i}.<suffix>``. :func:`stack_layers` turns the per-layer
keys into stacked keys ``<stack>.*.<suffix>`` (torch layout, ``[n, ...]``) *lazily*, so
``load_state`` still reads only each device's slice, and a mapping table names stacked sources
like any other key; :func:`unstack_layers` undoes it on export.
"""
from __future__ import annotations

import re

import numpy as np

from didr_jax.weights.mapping import WeightMismatchError


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


def stack_layers(tensors: dict, stacks: dict[str, tuple[int, set[str]]], what: str) -> dict:
  """Per-layer keys ``<stack>.{i}.<suffix>`` -> lazy ``<stack>.*.<suffix>`` [n, ...].

  ``stacks``: {stack: (the model's layer count n, the block's torch suffixes)}; only those
  suffixes of layers 0..n-1 are stacked. A missing layer key or a shape differing from layer 0's
  raises, naming the key; anything else (a layer beyond n, an unknown suffix) is passed through
  for ``load_state`` to report as unused.
  """
  layer_key = re.compile(rf"^({'|'.join(map(re.escape, stacks))})\.(\d+)\.(.+)$")
  groups: dict[tuple[str, str], dict[int, str]] = {}
  out = {}
  for key, value in tensors.items():
    m = layer_key.match(key)
    stack = m.group(1) if m else None
    if m and int(m.group(2)) < stacks[stack][0] and m.group(3) in stacks[stack][1]:
      groups.setdefault((stack, m.group(3)), {})[int(m.group(2))] = key
    else:
      out[key] = value
  missing, misshaped = [], []
  for (stack, suffix), idx in sorted(groups.items()):
    keys = [f"{stack}.{i}.{suffix}" for i in range(stacks[stack][0])]
    missing += [k for k in keys if k not in tensors]
    present = [k for k in keys if k in tensors]
    ref = tuple(tensors[present[0]].shape)
    misshaped += [f"{k}: {tuple(tensors[k].shape)} != {present[0]} {ref}" for k in present
                  if tuple(tensors[k].shape) != ref]
    if len(present) == len(keys):
      out[f"{stack}.*.{suffix}"] = LazyStack([tensors[k] for k in keys])
  if missing or misshaped:
    parts = [f"{what}: weights do not match the model"]
    if missing:
      parts.append(f"  keys missing from the weights ({len(missing)}): " + ", ".join(missing[:40]))
    unused = sorted(k for k in out if layer_key.match(k))
    if unused:
      parts.append(f"  unused keys ({len(unused)}): " + ", ".join(unused[:40]))
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
