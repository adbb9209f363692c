"""The posterior-sample DRS estimators' variance table, computed once per run and kept with it.

The table depends on the frozen reference and a fixed sample set only, but its float reductions
depend on the mesh: a resumed run (possibly on other devices) reads the stored values instead of
recomputing them, so it continues with exactly the table it started with.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax import log
from didr_jax.training.state import replicate


class TableFileError(ValueError):
  """The stored variance table cannot be read."""


def persisted_variance_table(path: str, compute, mesh) -> dict:
  """{"t", "v"} replicated on ``mesh``: read from ``path`` (JSON) if present, else ``compute()``
  (every process computes; process 0 writes the file atomically)."""
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
      t, v = np.asarray(stored["t"], np.float32), np.asarray(stored["v"], np.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise TableFileError(f"{path}: not a variance table ({e}); delete it to recompute") from e
    if t.shape != v.shape or t.ndim != 1 or np.any(np.diff(t) <= 0):
      raise TableFileError(f"{path}: needs increasing 't' and 'v' of one length")
    log.info("variance table read from %s", path)
  else:
    table = compute()
    t, v = (np.asarray(jax.device_get(table[k]), np.float32) for k in ("t", "v"))
    if jax.process_index() == 0:
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"t": t.tolist(), "v": v.tolist(),
                   "meaning": "v(t): average per-dimension posterior variance of x0 (Analytic-DPM)"},
                  f, indent=1)
      os.replace(tmp, path)
    log.info("variance table computed (%d points) and written to %s", t.shape[0], path)
  return {"t": replicate(jnp.asarray(t), mesh), "v": replicate(jnp.asarray(v), mesh)}
