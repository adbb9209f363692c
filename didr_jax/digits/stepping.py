"""How the digits phases drive the trainer's step functions on XLA:CPU.

XLA:CPU canonicalises convolutions (the rewrite that sends them to the fast Eigen/YNNPACK kernels)
in the entry computation only: the transposed convolutions of a backward pass that sit inside a
while loop (``lax.scan``) fall back to a naive emitter. Measured on the 2-core development
machine (load ~8, ``benchmarks/digits_scan.py``): a 32-channel 3x3 conv weight-gradient at batch
128 on 8x8 takes 9 ms in a plain jit and 390 ms per iteration inside a scan; the digits UNet's
DSM step takes 0.2 s plainly and 1.6-2.1 s inside ``scan_chunk``.

So the digits phases run the trainer's own step functions (``make_fit_step``,
``AlignSteps.ta_update`` / ``gen_update``) unrolled in Python instead of under ``lax.scan``:

* :func:`unrolled_chunk` - ``scan_chunk``'s contract (conds with a leading [n] axis, metrics
  stacked [n]) without the loop;
* :class:`AlignChunk` - one outer step = one compiled program of k_ta TA updates (shared by every
  method and by the TA warm-up) followed by one compiled generator update, metrics merged exactly
  as ``AlignSteps.outer`` merges them (last TA update's metrics, skipped TA updates summed).

The RNG stream, the update order and the state are those of ``AlignSteps.outer``
(tests/test_digits_steps.py checks the equality). The DRP's own K-step ``lax.scan``
(objectives/drs.py) is left as it is: its backward convolutions still take the slow path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.training.steps import AlignSteps, compile_chunk


def unrolled_chunk(step_fn, num_steps: int):
  """``num_steps`` calls of ``step_fn(state, frozen, cond)`` traced one after the other."""
  def chunk(state, frozen, conds):
    stacked = []
    for i in range(num_steps):
      cond = None if conds is None else jax.tree.map(lambda c: c[i], conds)
      state, metrics = step_fn(state, frozen, cond)
      stacked.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)
  return chunk


def ta_updates(steps: AlignSteps, k_ta: int):
  """k_ta TA updates; metrics of the last one, skipped updates summed (as ``AlignSteps.outer``)."""
  def run(state, frozen, cond):
    skipped = []
    for _ in range(k_ta):
      state, metrics = steps.ta_update(state, frozen, cond)
      skipped.append(metrics["ta_skipped"])
    return state, dict(metrics, ta_skipped=sum(skipped))
  return run


def _advance(state):
  return state.replace(step=state.step + 1)


class AlignChunk:
  """A one-outer-step chunk for ``run_chunks``: the compiled TA program, then (``with_generator``)
  the compiled generator program; without the generator it is a TA warm-up step (the step still
  advances, as in ``AlignSteps.ta_warmup``)."""

  def __init__(self, ta_program, gen_program=None, state_shardings=None):
    self.ta_program, self.gen_program = ta_program, gen_program
    self._advance = None
    if gen_program is None:
      self._advance = jax.jit(_advance, in_shardings=(state_shardings,), out_shardings=state_shardings,
                              donate_argnums=0)

  @staticmethod
  def compile_ta(steps: AlignSteps, k_ta: int, state, frozen, conds, mesh):
    return compile_chunk(unrolled_chunk(ta_updates(steps, k_ta), 1), state, frozen, conds, mesh,
                         f"ta_updates(k_ta={k_ta})")

  @staticmethod
  def compile_gen(steps: AlignSteps, state, frozen, conds, mesh, name: str):
    return compile_chunk(unrolled_chunk(steps.gen_update, 1), state, frozen, conds, mesh, name)

  def __call__(self, state, frozen, conds):
    state, ta_metrics = self.ta_program(state, frozen, conds)
    if self.gen_program is None:
      return self._advance(state), ta_metrics
    state, gen_metrics = self.gen_program(state, frozen, conds)
    return state, dict(gen_metrics, **ta_metrics)
