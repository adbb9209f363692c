"""The outer training loop: chunks of jitted steps, logging, checkpoints, SIGTERM/Ctrl-C saves.

Stopping is decided collectively: after every chunk each process contributes its vote (a signal it
caught, JAX's preemption sync point) and every process acts on the gathered votes, so all of them
save the same step and stop together even when a scheduler's SIGTERM reaches the hosts at
different times (one host alone in the collective save would wait for the others forever).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import signal
import threading
from typing import Callable

import jax
import numpy as np

from didr_jax.sharding import to_host
from didr_jax.training.metrics import MetricWriter, Progress, reduce_chunk_metrics


class Preempted(Exception):
  """Raised after a SIGTERM/SIGINT-triggered checkpoint was written."""


class NonFiniteError(FloatingPointError):
  """Too many consecutive non-finite updates."""


class StopSignal:
  """Turns SIGTERM and SIGINT into a flag checked between chunks (main thread only).

  Leaving the block with ``Preempted`` (the stop is under way on every process) ignores SIGTERM
  from then on: a scheduler fanning the signal out late to this host must not turn the clean exit
  after the saved checkpoint into a kill.
  """

  def __init__(self):
    self.signum = None
    self.decided = None   # the message of the stop every process has decided on, once it has
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    self.signum = signum

  def __exit__(self, exc_type, exc, tb):
    stopping = exc_type is not None and issubclass(exc_type, Preempted)
    for sig, prev in self._previous.items():
      signal.signal(sig, signal.SIG_IGN if stopping and sig == signal.SIGTERM else prev)
    return False

  @property
  def requested(self) -> bool:
    return self.signum is not None


def submit_job(pool, stop: StopSignal | None, fn: Callable, *args):
  """``pool.submit(fn, *args)`` for a job that must not start once a stop is decided: the pool
  starts a queued job the moment a stopped one returns, before the main thread cancels the queue,
  and that start (a compile, a chunk, its collectives) would happen on some processes only."""
  def job():
    if stop is not None and stop.decided is not None:
      raise Preempted(stop.decided)
    return fn(*args)
  return pool.submit(job)


def wait_for_jobs(jobs, pool, poll_s: float = 0.2) -> list:
  """The results of ``jobs`` (futures of ``pool``); the first failure (a stop included) is raised
  once the running jobs have finished or stopped at their next chunk (queued ones are cancelled).

  The main thread polls instead of blocking: a process-directed SIGTERM may be delivered to any
  thread, and Python runs the handler (which sets the stop flag the jobs read) only when the main
  thread executes bytecode, so a main thread blocked until every job is done would let them all
  run to their end."""
  try:
    pending = set(jobs)
    while pending:
      done, pending = concurrent.futures.wait(pending, timeout=poll_s,
                                              return_when=concurrent.futures.FIRST_EXCEPTION)
      for job in jobs:                 # in submission order: the stopped job before those it stopped
        if job in done and job.exception() is not None:
          raise job.exception()
    return [job.result() for job in jobs]
  except BaseException:
    pool.shutdown(wait=True, cancel_futures=True)
    raise


def gather_votes(local: np.ndarray) -> np.ndarray:
  """Every process's vector ``local`` (same shape everywhere) as rows of one array, on every process.

  A collective: every process calls it at the same point of the loop.
  """
  if jax.process_count() == 1:
    return local[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(local))


def stop_reason(votes: np.ndarray) -> str | None:
  """Why to stop, from the gathered ``[process, (signal number or 0, preemption notice)]`` votes
  (the same on every process, so every process takes the same decision); None: go on."""
  signalled = np.flatnonzero(votes[:, 0])
  if signalled.size:
    reason = f"signal {int(votes[signalled[0], 0])}"
    if len(votes) > 1:
      word = "process" if signalled.size == 1 else "processes"
      reason += f" on {word} {', '.join(str(p) for p in signalled)}"
    return reason
  if votes[:, 1].any():
    return "a preemption notice"
  return None


_START_BARRIERS = itertools.count()
START_TIMEOUT_S = 2 * 3600   # the longest another host may still be compiling the chunk


def start_together(name: str, step: int):
  """Every process enters the first chunk together (a coordination-service barrier, no device
  collective). A host that loads the chunk from the persistent compilation cache can otherwise
  reach the first collective minutes before a host that compiles it (only process 0 writes the
  cache, and on CPU the others' cache keys differ), and CPU collectives (gloo) give up on a peer
  that is 30 s late when they first connect."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost
  key = f"didr_jax_start_{next(_START_BARRIERS)}_{name}_{step}"
  multihost.get_barrier_sync_fn()(key=key, timeout_ms=START_TIMEOUT_S * 1000)


def run_chunks(*, name: str, state, frozen, chunk: Callable, steps_per_chunk: int, num_steps: int,
               conds_for: Callable[[int], object], checkpointer=None, writer: MetricWriter | None,
               stop: StopSignal | None = None, log_every_chunks: int = 1,
               on_chunk: Callable | None = None, on_settled: Callable | None = None):
  """Run ``chunk`` until ``state.step == num_steps``; returns the final state.

  The host never waits for a chunk it has just dispatched: the next chunk's conditioning
  (``conds_for(step)``: sampling, tokenising, table lookups) is prepared right after a dispatch,
  and a chunk's metrics are read one chunk late, after the next chunk is dispatched, so the
  device queue stays full. A chunk is settled at once (its metrics read before anything else
  happens) when it is to be saved, when training stops, and at the end, so a checkpoint never
  follows unread metrics (``on_settled`` may raise to refuse the state, e.g. non-finite updates).

  ``on_chunk(step, state)`` runs right after a chunk is dispatched, with its (future) state: work
  that needs the state itself (evaluation). ``on_settled(step, metrics, host)`` runs when the
  chunk's device ``metrics`` are read; ``host`` is their reduction on logging chunks, else None.
  Every process must call this with the same arguments: the stop votes are gathered after each chunk.
  """
  step = int(to_host(state.step))
  if step < num_steps:
    start_together(name, step)
  progress = Progress(name, num_steps, step)
  n_chunk = 0
  conds = conds_for(step) if step < num_steps else None
  unread = []           # the dispatched chunk whose metrics are not read yet: [(step, n, metrics)]

  def settle():
    if not unread:
      return
    done_step, n, metrics = unread.pop()
    host = None
    if writer is not None and (n % log_every_chunks == 0 or done_step >= num_steps):
      host = reduce_chunk_metrics(metrics)
      writer.write(done_step, host, prefix=f"{name}/")
      progress.log(done_step, {k: v for k, v in host.items() if k.endswith("loss") or k == "reward"})
    if on_settled is not None:
      on_settled(done_step, metrics, host)

  while step < num_steps:
    state, metrics = chunk(state, frozen, conds)
    step += steps_per_chunk
    n_chunk += 1
    if step < num_steps:
      conds = conds_for(step)
    settle()                                      # the previous chunk, while this one runs
    unread.append((step, n_chunk, metrics))
    if on_chunk is not None:
      on_chunk(step, state)
    if checkpointer is not None:
      if checkpointer.due(step) or step >= num_steps:
        settle()
      checkpointer.save(step, state, force=step >= num_steps)
    if stop is None and checkpointer is None:
      continue                                    # nothing to stop for (the same on every process)
    notice = checkpointer is not None and checkpointer.reached_preemption() and step < num_steps
    signum = stop.signum if stop is not None and stop.requested else 0
    reason = stop_reason(gather_votes(np.array([signum, int(notice)], np.int32)))
    if reason is not None:
      settle()
      if checkpointer is not None:
        checkpointer.save(step, state, force=True)
        checkpointer.close()
      message = f"[{name}] stopped by {reason} at step {step}; checkpoint saved"
      if stop is not None:
        stop.decided = message
      raise Preempted(message)
  settle()
  return state
