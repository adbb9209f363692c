"""Process-0 metrics: JSONL lines, TensorBoard scalars/images, and a progress line with ETA."""
from __future__ import annotations

import json
import os
import threading
import time

import jax
import numpy as np
from didr_jax import log


class MetricWriter:
  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.main = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._lock = threading.Lock()     # the toy writes from one thread per method
    if self.main:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: dict, prefix: str = ""):
    if not self.main:
      return
    row = {"step": int(step)}
    row.update({f"{prefix}{k}": float(v) for k, v in scalars.items()})
    with self._lock, open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, int(step))

  def write_image(self, step: int, tag: str, image_hwc: np.ndarray):
    if self.main and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image_hwc), int(step), dataformats="HWC")

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Steps/s and ETA from wall time since the first logged step."""

  def __init__(self, name: str, total: int, start: int):
    self.name, self.total, self.start = name, total, start
    self.t0 = time.time()

  def line(self, step: int) -> str:
    done = step - self.start
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    return (f"[{self.name}] step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%) "
            f"{rate:.1f} steps/s, ETA {eta:.0f}s")

  def log(self, step: int, metrics: dict | None = None):
    extra = "" if not metrics else " " + " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
    log.info("%s%s", self.line(step), extra)


def reduce_chunk_metrics(metrics: dict) -> dict:
  """Host means over a chunk's stacked per-step metrics (one device->host copy per chunk).

  "ratio:<name>" metrics are stacked (numerator, denominator) sums: they reduce to
  sum(num) / sum(den) under "<name>", and are left out when the chunk saw no denominator. A
  second moment "ratio:<name>_sq" next to "ratio:<name>" becomes "<name>_std".
  """
  from didr_jax.objectives.generator import RATIO_PREFIX
  from didr_jax.sharding import to_host
  out = {}
  for k, v in metrics.items():
    v = np.asarray(to_host(v), np.float64)
    if k.startswith(RATIO_PREFIX):
      num, den = v.reshape(-1, 2).sum(0)
      if den > 0:
        out[k[len(RATIO_PREFIX):]] = float(num / den)
    else:
      out[k] = float(np.mean(v))
  for k in [k for k in out if k.endswith("_sq") and k[:-3] in out]:
    out[k[:-3] + "_std"] = float(np.sqrt(max(out.pop(k) - out[k[:-3]] ** 2, 0.0)))
  return out
