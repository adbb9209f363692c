"""Pure train steps: TA DSM update, generator update, K_TA:1 outer step, scanned chunks.

Every function here is ``(state, frozen, conds) -> (state, metrics)`` and is jitted by
:func:`compile_chunk` with explicit shardings and donation of the state.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from didr_jax import log

from didr_jax.objectives import ObjectiveConfig, dsm_loss, generator_loss
from didr_jax.training.state import FitState, TrainState, abstract_of, shardings_of
from didr_jax.training.task import Task


@dataclasses.dataclass(frozen=True)
class StepConfig:
  batch_size: int
  k_ta: int
  ema_decay: float = 0.0           # 0: no EMA
  grad_accum: int = 1              # microbatches per update (same gradient, 1/grad_accum activations)
  reward_metrics_every: int = 1    # DI / DIDR: report the batch reward on every n-th step only
  # A step's cond is {"gen": c, "ta": c stacked [k_ta]}: every TA update sees its own batch of
  # conditions (DMD2 draws new prompts per fake-score update); False: one cond for all updates.
  fresh_ta_conds: bool = False

  def __post_init__(self):
    if self.reward_metrics_every < 1:
      raise ValueError(f"reward_metrics_every must be >= 1, got {self.reward_metrics_every}")
    if self.grad_accum < 1 or self.batch_size % self.grad_accum:
      raise ValueError(f"align.grad_accum={self.grad_accum} must be >= 1 and divide the batch "
                       f"({self.batch_size})")


def _guarded_update(tx, params, opt, grads, loss):
  """Apply the update only when loss and gradients are finite (a NaN/Inf step is skipped)."""
  gnorm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = tx.update(grads, opt, params)
  new_params = optax.apply_updates(params, updates)
  pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  return pick(new_params, params), pick(new_opt, opt), gnorm, ok


def microbatches(batch, n: int):
  """Leaves [B, ...] -> [n, B/n, ...]. Microbatch j holds samples j, j+n, j+2n, ...: every device's
  contiguous shard of the batch axis holds an equal part of each microbatch, so the split moves no
  data between devices (the batch must divide by n x the data-parallel devices)."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn, params, batch, n: int):
  """((loss, metrics), grads) of ``loss_fn(params, batch)`` averaged over ``n`` equal microbatches
  in a ``lax.scan`` (equal to the full batch for per-sample-mean losses); n = 1 is the plain call."""
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    return value_and_grad(params, batch)

  def body(acc, mb):
    (loss, metrics), grads = value_and_grad(params, mb)
    return jax.tree.map(jnp.add, acc, (loss, grads)), metrics

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), metrics = jax.lax.scan(body, zeros, microbatches(batch, n))
  mean = lambda tree: jax.tree.map(lambda x: x / n, tree)
  return (loss / n, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)), mean(grads)


class AlignSteps(NamedTuple):
  """The step functions of one alignment run, each ``(state, frozen, cond) -> (state, metrics)``."""
  outer: Callable        # k_ta TA updates, then one generator update (+ EMA): one outer step
  ta_warmup: Callable    # k_ta TA updates, generator frozen: an outer step of the TA warm-up
  ta_update: Callable    # one TA update (benchmarks)
  gen_update: Callable   # one generator update (benchmarks, tests)


def make_outer_step(task: Task, obj: ObjectiveConfig, step_cfg: StepConfig, gen_tx, ta_tx,
                    batch_sharding=None) -> AlignSteps:
  """The alignment steps. An outer step is k_ta TA updates then one generator update (plus EMA);
  a TA warm-up step (docs/method.md section 2: the TA catches up with a distilled generator
  before it moves)
  does the TA updates only. Both advance ``state.step``, the data position."""
  shape = (step_cfg.batch_size,) + tuple(task.sample_shape)
  n_micro = step_cfg.grad_accum

  def constrain(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  def draw(state, t_range, row_keys=False):
    """(new rng, batch of z, t, eps [, per-row keys]) for one update; microbatches are slices of
    this batch. Per-row keys (stochastic DRS estimators) come from a fifth split, so the other
    draws are the same as without them."""
    rng, kz, kt, ke, *kd = jax.random.split(state.rng, 5 if row_keys else 4)
    batch = {"z": constrain(jax.random.normal(kz, shape)),
             "t": task.sample_t(kt, step_cfg.batch_size, t_range),
             "eps": constrain(jax.random.normal(ke, shape))}
    if row_keys:
      batch["keys"] = jax.random.split(kd[0], step_cfg.batch_size)
    return rng, batch

  def ta_update(state: TrainState, frozen, cond):
    rng, batch = draw(state, task.ta_t_range)

    gen = task.params("gen", state.gen_params, frozen)

    def loss_fn(p, mb):
      x0 = task.generator_apply(gen, constrain(mb["z"]), mb["cond"])
      return dsm_loss(task.denoiser(task.params("ta", p, frozen)), x0, mb["t"], constrain(mb["eps"]), task.schedule, mb["cond"])

    (loss, metrics), grads = accumulated_value_and_grad(loss_fn, state.ta_params,
                                                        dict(batch, cond=cond), n_micro)
    params, opt, gnorm, ok = _guarded_update(ta_tx, state.ta_params, state.ta_opt, grads, loss)
    metrics = dict(metrics, ta_grad_norm=gnorm, ta_skipped=1.0 - ok.astype(jnp.float32))
    return state.replace(ta_params=params, ta_opt=opt, rng=rng), metrics

  def gen_update(state: TrainState, frozen, cond):
    rng, batch = draw(state, task.gen_t_range, row_keys=obj.stochastic_drs)
    every = step_cfg.reward_metrics_every
    on = True if every == 1 else (state.step + 1) % every == 0   # the last step of each n
    ref = task.denoiser(jax.lax.stop_gradient(frozen["ref"]), obj.cfg_w)
    ta = task.denoiser(jax.lax.stop_gradient(task.params("ta", state.ta_params, frozen)))
    reward = lambda x0, c: task.reward_apply(jax.lax.stop_gradient(frozen), x0, c)

    def loss_fn(p, mb):
      return generator_loss(obj, generate=lambda zz, c: task.generator_apply(task.params("gen", p, frozen), zz, c), ta=ta,
                            ref=ref, reward=reward, schedule=task.schedule, z=constrain(mb["z"]),
                            cond=mb["cond"], t=mb["t"], eps=constrain(mb["eps"]),
                            exact_drs=task.exact_drs, keys=mb.get("keys"),
                            drs_table=frozen.get("drs_table"), reward_metrics=on)

    (loss, metrics), grads = accumulated_value_and_grad(loss_fn, state.gen_params,
                                                        dict(batch, cond=cond), n_micro)
    params, opt, gnorm, ok = _guarded_update(gen_tx, state.gen_params, state.gen_opt, grads, loss)
    ema = state.gen_ema
    if ema is not None:
      d = step_cfg.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    bad = jnp.where(ok, 0, state.bad_steps + 1)
    metrics = dict(metrics, gen_grad_norm=gnorm, gen_skipped=1.0 - ok.astype(jnp.float32),
                   bad_steps=bad.astype(jnp.float32))
    return state.replace(gen_params=params, gen_opt=opt, gen_ema=ema, rng=rng,
                         step=state.step + 1, bad_steps=bad), metrics

  def split(cond):
    """(generator cond, the TA updates' stacked conds or None: all use the generator's)."""
    return (cond["gen"], cond["ta"]) if step_cfg.fresh_ta_conds else (cond, None)

  def ta_updates(state: TrainState, frozen, cond):
    """k_ta TA updates; metrics of the last one, skipped updates summed."""
    shared, ta_conds = split(cond)

    def ta_body(st, c):
      return ta_update(st, frozen, shared if c is None else c)
    state, ta_metrics = jax.lax.scan(ta_body, state, ta_conds, length=step_cfg.k_ta)
    metrics = {k: v[-1] for k, v in ta_metrics.items()}
    metrics["ta_skipped"] = jnp.sum(ta_metrics["ta_skipped"])
    return state, metrics

  def outer_step(state: TrainState, frozen, cond):
    state, ta_metrics = ta_updates(state, frozen, cond)
    state, gen_metrics = gen_update(state, frozen, split(cond)[0])
    return state, dict(gen_metrics, **ta_metrics)

  def ta_warmup_step(state: TrainState, frozen, cond):
    state, ta_metrics = ta_updates(state, frozen, cond)
    return state.replace(step=state.step + 1), ta_metrics

  return AlignSteps(outer=outer_step, ta_warmup=ta_warmup_step, ta_update=ta_update,
                    gen_update=gen_update)


def make_fit_step(loss_fn: Callable, tx):
  """Supervised step for ``loss_fn(params, key) -> (loss, metrics)`` (pre-training phases)."""
  def fit_step(state: FitState, frozen, cond):
    rng, key = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, key, frozen), has_aux=True)(state.params)
    params, opt, gnorm, ok = _guarded_update(tx, state.params, state.opt, grads, loss)
    metrics = dict(metrics, grad_norm=gnorm, skipped=1.0 - ok.astype(jnp.float32))
    return state.replace(params=params, opt=opt, rng=rng, step=state.step + 1), metrics
  return fit_step


def scan_chunk(step_fn: Callable, num_steps: int):
  """``num_steps`` steps in one ``lax.scan``; conds carry a leading [num_steps] axis (or None)."""
  def chunk(state, frozen, conds):
    def body(st, cond):
      return step_fn(st, frozen, cond)
    state, metrics = jax.lax.scan(body, state, conds, length=num_steps)
    return state, metrics
  return chunk


def lower_chunk(chunk_fn, state, frozen, conds, mesh):
  """``chunk_fn`` lowered with explicit in/out shardings and the state donated; the inputs may be
  arrays or ShapeDtypeStructs with shardings (``didr_jax.pipelines.plan`` lowers for a TPU
  topology that is not attached)."""
  state_sh = shardings_of(state)
  abs_in = (abstract_of(state), abstract_of(frozen), abstract_of(conds))
  in_sh = (state_sh, shardings_of(frozen), shardings_of(conds))
  with jax.set_mesh(mesh):
    return jax.jit(chunk_fn, in_shardings=in_sh, out_shardings=(state_sh, NamedSharding(mesh, P())),
                   donate_argnums=(0,)).lower(*abs_in)


def compile_chunk(chunk_fn, state, frozen, conds, mesh, name: str):
  """AOT-compile ``chunk_fn`` (see :func:`lower_chunk`)."""
  t0 = time.time()
  lowered = lower_chunk(chunk_fn, state, frozen, conds, mesh)
  with jax.set_mesh(mesh):
    compiled = lowered.compile()
  log.info("compiled %s in %.1fs", name, time.time() - t0)
  return compiled
