"""Toy step throughput: steps/s and XLA GFLOP/s of the jitted DSM, TA and generator steps.

  python benchmarks/toy.py                 # step table (default toy config)
  python benchmarks/toy.py --full          # also the wall time of the full default toy (all methods)

Prints one table; the matmul peak is measured in the same run for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.toy import get_config  # noqa: E402
from didr_jax import sharding  # noqa: E402
from didr_jax.objectives import dsm_loss  # noqa: E402
from didr_jax.toy import experiment  # noqa: E402
from didr_jax.training import state as st  # noqa: E402
from didr_jax.training.steps import StepConfig, make_fit_step, make_outer_step, scan_chunk  # noqa: E402


def _time_chunk(step_fn, state, frozen, n_steps, repeats=3):
  """Best-of-``repeats`` seconds per step of ``n_steps`` steps in one jitted scan, and XLA's FLOPs
  of one step (cost analysis of the un-scanned step: a while loop's body is counted once)."""
  single = jax.jit(step_fn).lower(state, frozen, None).compile()
  flops = (single.cost_analysis() or {}).get("flops", float("nan")) * n_steps
  compiled = jax.jit(scan_chunk(step_fn, n_steps)).lower(state, frozen, None).compile()
  state, m = compiled(state, frozen, None)
  jax.block_until_ready(m)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = compiled(state, frozen, None)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t0)
  return best / n_steps, flops / n_steps


def matmul_peak(n=1024, repeats=5):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--full", action="store_true", help="also run the whole default toy")
  parser.add_argument("--steps", type=int, default=50, help="steps per timed chunk")
  args = parser.parse_args()
  cfg = get_config("")
  toy = experiment.Toy(cfg)
  b, n = cfg.align.batch, args.steps
  rows = []
  peak = matmul_peak()

  def loss_fn(params, key, frozen):
    kx, kt, ke = jax.random.split(key, 3)
    x0 = toy.problem.sample_q0(kx, b)
    t = jax.random.uniform(kt, (b,), minval=1e-3, maxval=1.0)
    return dsm_loss(toy.task.denoiser(params), x0, t, jax.random.normal(ke, x0.shape), toy.schedule)

  with sharding.model_context(toy.mesh, toy.rules):
    tx = st.make_optimizer(cfg.reference.optimizer)
    fit = st.init_fit_state(params=toy.ref_init, tx=tx, seed=0, mesh=toy.mesh)
    sec, fl = _time_chunk(make_fit_step(loss_fn, tx), fit, {}, n)
    rows.append(("reference DSM step", sec, fl))
    for method in cfg.methods:
      obj = experiment.objective_config(cfg, method)
      gtx, ttx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
      step_cfg = StepConfig(batch_size=b, k_ta=cfg.align.k_ta)
      outer, _, ta_update, gen_update = make_outer_step(toy.task, obj, step_cfg, gtx, ttx)
      state = st.init_train_state(gen_params=toy.gen_init, ta_params=toy.ref_init, gen_tx=gtx, ta_tx=ttx,
                                  ema=False, seed=0, mesh=toy.mesh)
      frozen = {"ref": toy.ref_init}
      if method == cfg.methods[0]:
        ta_sec, ta_fl = _time_chunk(ta_update, state, frozen, n)
        rows.append(("TA step", ta_sec, ta_fl))
      sec, gen_fl = _time_chunk(gen_update, state, frozen, n)
      rows.append((f"generator step: {method}", sec, gen_fl))
      sec, _ = _time_chunk(outer, state, frozen, n)
      # The outer step's inner TA scan would be counted once by cost analysis: add it up instead.
      rows.append((f"outer step ({cfg.align.k_ta} TA + 1 gen): {method}", sec, cfg.align.k_ta * ta_fl + gen_fl))
  print(f"\nbackend {jax.default_backend()}, {jax.device_count()} device(s), batch {b}, "
        f"width {cfg.network.width} x depth {cfg.network.depth}; matmul peak {peak:.1f} GFLOP/s")
  print("| step | ms/step | steps/s | MFLOP/step | GFLOP/s | % of matmul peak |")
  print("|---|---|---|---|---|---|")
  for name, sec, fl in rows:
    gf = fl / sec / 1e9
    print(f"| {name} | {sec * 1e3:.2f} | {1 / sec:.0f} | {fl / 1e6:.1f} | {gf:.1f} | {100 * gf / peak:.0f}% |")
  est = (cfg.reference.steps * rows[0][1] + sum(r[1] for r in rows if r[0].startswith("outer")) * cfg.align.steps)
  print(f"\nestimated training time of the default toy (reference + alignment of every method, no distill/eval): {est:.0f}s")
  if args.full:
    with tempfile.TemporaryDirectory() as wd:
      t0 = time.perf_counter()
      res = experiment.run(cfg, wd)
      total = time.perf_counter() - t0
    print(f"\nfull default toy: {total:.0f}s wall (pretraining {res['pretraining_wall_s']:.0f}s; "
          + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in res["methods"].items()) + ")")


if __name__ == "__main__":
  record = LoadRecord()
  main()
  record.done()
