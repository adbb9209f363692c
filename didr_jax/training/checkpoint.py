"""Orbax CheckpointManager wrapper: async, keep-N, every-N, config-checked, exact resume."""
from __future__ import annotations

import contextlib
import json
import os
import threading

import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from didr_jax.training.state import abstract_of


class ConfigMismatchError(ValueError):
  """The workdir holds a checkpoint written by a different config."""


class CheckpointNotFoundError(ValueError):
  """No checkpoint (or not the requested step) in a checkpoint folder."""


def _diff(saved: dict, current: dict, prefix="") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: checkpoint has {a!r}, config has {b!r}")
  return out


def _normalise(d):
  """Round-trip through JSON so tuples compare equal to the lists orbax gives back."""
  return json.loads(json.dumps(d))


class PreemptionCounter:
  """JAX's preemption sync point, asked with a process-wide call counter.

  A preemption notice (on clusters: a SIGTERM that reaches JAX's own handler, i.e. outside the
  loop's ``StopSignal``, e.g. while models load) sets the sync point to (the largest counter any
  process has passed) + 1, and only a call with exactly that counter returns True. Training steps
  are no such counter: chunks advance them by ``steps_per_chunk``, each phase restarts them, and a
  resumed run starts past a point set before its first chunk. Counting the calls themselves (one
  per chunk, on every process) always meets it at the next chunk. False on one process, or when
  the preemption service is off.
  """

  def __init__(self):
    self.calls = 0

  def reached(self) -> bool:
    self.calls += 1
    try:
      return bool(multihost_utils.reached_preemption_sync_point(self.calls))
    except RuntimeError:   # jax_enable_preemption_service is off
      return False


PREEMPTION = PreemptionCounter()


# Orbax keys a save's directory-creation signals by a process-wide "current operation id" that
# every save advances; two saves started at once from threads (the toy's methods run in threads,
# each with its own checkpointer) read each other's id and collide on their tmp folders
# (FileExistsError, or a wait on a signal that never comes). The id is captured while ``save``
# blocks, so serialising the blocking part is enough; the async writes still overlap.
_SAVE_START = threading.Lock()


class Checkpointer:
  def __init__(self, directory: str, *, identity: dict, max_to_keep: int, save_every: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.identity = _normalise(identity)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.LatestN(max_to_keep),
            enable_async_checkpointing=async_save, create=True))
    # The training loop asks JAX's preemption sync point (reached_preemption below) and forces the
    # save itself. Orbax must not ask it as well: it would pass training steps as the sync counter.
    self.manager.reached_preemption = lambda step: False

  def latest_step(self):
    return self.manager.latest_step()

  def check_identity(self):
    """Raise (before any training) if the latest checkpoint came from a different config."""
    step = self.manager.latest_step()
    if step is None:
      return
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    diffs = _diff(meta["identity"], self.identity)
    if diffs:
      raise ConfigMismatchError(f"{self.directory} holds a checkpoint of a different config: "
                                + "; ".join(diffs[:5]))

  def restore(self, like):
    """Restore the latest checkpoint onto the shardings of ``like``; None when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    self.check_identity()
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_of(like)), meta=ocp.args.JsonRestore()))
    return out["state"]

  def due(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without ``force`` writes a checkpoint (the save interval)."""
    return self.manager.latest_step() != step and self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Every process calls this (orbax synchronises); ``force`` ignores the save interval.

    A step that is already saved (an interval save followed by a forced one) is not rewritten.
    Saves of different checkpointers in one process start one at a time (``_SAVE_START``).
    """
    if self.manager.latest_step() == step:
      return False
    with _SAVE_START:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({"step": int(step), "identity": self.identity})), force=force)

  def reached_preemption(self) -> bool:
    """True once JAX's preemption sync point is reached (save, then stop); every process calls this
    at the same points of training (once per chunk). See ``PreemptionCounter``."""
    return PREEMPTION.reached()

  def close(self):
    """Wait for the pending async saves, then release the manager (a second call does nothing)."""
    if getattr(self, "_closed", False):
      return
    self.manager.wait_until_finished()
    self.manager.close()
    self._closed = True


@contextlib.contextmanager
def closing_all(checkpointers):
  """Close every checkpointer when the block is left, by an exception (a stop) too: a stop raised
  in one thread must not end the process while another thread's async save is still writing (its
  partial step folder would break the rerun's save of that step)."""
  try:
    yield
  finally:
    for c in checkpointers:
      c.close()


def available_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in ``directory``; CheckpointNotFoundError when none."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"{directory}: no checkpoint folder")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps())
  finally:
    manager.close()
  if not steps:
    raise CheckpointNotFoundError(f"{directory}: holds no complete checkpoint")
  return steps


def restore_fields(directory: str, like: dict, step: int | None = None) -> tuple[int, dict]:
  """(step, {field: tree}): only the TrainState fields in ``like`` ({field: abstract tree with
  shardings}) of checkpoint ``step`` (default: the latest), e.g. the generator for an export
  without materialising the TA or the optimizer states."""
  steps = available_steps(directory)
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = max(steps) if step is None else int(step)
    if step not in steps:
      raise CheckpointNotFoundError(f"{directory}: no checkpoint of step {step}; it has {sorted(steps)}")
    restore = ocp.args.PyTreeRestore(item=like, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(like))
    out = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
  finally:
    manager.close()
  return step, dict(out)


def phase_checkpointers(workdir: str, identities: dict, ckpt_cfg) -> dict:
  """One Checkpointer per phase in ``workdir/checkpoints/<phase>``; a workdir written by another
  config is refused (ConfigMismatchError) before anything trains."""
  ckpts = {name: Checkpointer(os.path.join(workdir, "checkpoints", name), identity=ident,
                              max_to_keep=ckpt_cfg.keep, save_every=ckpt_cfg.every_steps,
                              async_save=ckpt_cfg.async_save)
           for name, ident in identities.items()}
  for c in ckpts.values():
    c.check_identity()
  return ckpts
