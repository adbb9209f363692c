"""The outer training loop: chunks of jitted steps, logging, checkpoints, SIGTERM/Ctrl-C saves."""
from __future__ import annotations

import signal
import threading
from typing import Callable

import jax

from didr_jax.sharding import to_host
from didr_jax.training.metrics import MetricWriter, Progress, reduce_chunk_metrics


class Preempted(Exception):
  """Raised after a SIGTERM/SIGINT-triggered checkpoint was written."""


class NonFiniteError(FloatingPointError):
  """Too many consecutive non-finite updates."""


class StopSignal:
  """Turns SIGTERM and SIGINT into a flag checked between chunks (main thread only)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    return False

  @property
  def requested(self) -> bool:
    return self.signum is not None


def run_chunks(*, name: str, state, frozen, chunk: Callable, steps_per_chunk: int, num_steps: int,
               conds_for: Callable[[int], object], checkpointer=None, writer: MetricWriter | None,
               stop: StopSignal | None = None, log_every_chunks: int = 1, max_bad_steps: int = 0,
               on_chunk: Callable | None = None):
  """Run ``chunk`` until ``state.step == num_steps``; returns the final state.

  ``conds_for(step)`` gives the (sharded) conditioning of the chunk starting at ``step``.
  ``max_bad_steps`` > 0 stops with NonFiniteError after that many consecutive skipped updates.
  """
  step = int(to_host(state.step))
  progress = Progress(name, num_steps, step)
  n_chunk = 0
  while step < num_steps:
    state, metrics = chunk(state, frozen, conds_for(step))
    step += steps_per_chunk
    n_chunk += 1
    host = None
    if writer is not None and (n_chunk % log_every_chunks == 0 or step >= num_steps):
      host = reduce_chunk_metrics(metrics)
      writer.write(step, host, prefix=f"{name}/")
      progress.log(step, {k: v for k, v in host.items() if k.endswith("loss") or k == "reward"})
    if max_bad_steps > 0 and hasattr(state, "bad_steps"):
      bad = int(to_host(state.bad_steps))
      if bad >= max_bad_steps:
        raise NonFiniteError(f"[{name}] {bad} consecutive non-finite updates at step {step}; "
                             "the last good checkpoint is kept")
    if on_chunk is not None:
      on_chunk(step, state, host)
    if checkpointer is not None:
      checkpointer.save(step, state, force=step >= num_steps)
    reason = None
    if stop is not None and stop.requested:
      reason = f"signal {stop.signum}"
    elif checkpointer is not None and step < num_steps and checkpointer.reached_preemption(step):
      reason = "a preemption notice"
    if reason is not None:
      if checkpointer is not None:
        checkpointer.save(step, state, force=True)
        checkpointer.close()
      raise Preempted(f"[{name}] stopped by {reason} at step {step}; checkpoint saved")
  return state
