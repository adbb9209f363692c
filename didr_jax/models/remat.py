"""Rematerialisation (gradient checkpointing) policy as a config enum."""
from __future__ import annotations

from typing import Callable

import jax

REMAT_POLICIES = ("none", "full", "dots_no_batch", "offload")


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy for a config name (``none`` means no remat)."""
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots_no_batch":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if name == "offload":  # accelerator-only: saved dots go to pinned host memory
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"remat policy {name!r} unknown; choose one of {REMAT_POLICIES}")


def maybe_remat(fn: Callable, name: str, **kwargs) -> Callable:
  """``fn`` under ``jax.checkpoint`` with the named policy, or ``fn`` itself for ``none``."""
  if name == "none":
    return fn
  return jax.checkpoint(fn, policy=remat_policy(name), **kwargs)
