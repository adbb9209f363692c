"""Training phases of the digits experiment on the project's trainer: ``make_fit_step`` /
``make_outer_step`` step functions, ``compile_chunk``, ``run_chunks`` and the orbax
``Checkpointer`` (chunks unrolled instead of scanned: see ``stepping.py``).

classifiers -> reference DSM -> generator distillation -> shared TA warm-up -> one alignment run
per sweep point. Each phase restores its checkpoint and skips what is done.

The swept reward scale is data, not code: ``frozen["reward_scale"]`` multiplies the reward
(``r_s = s log p_clf``) and the objective runs with alpha_rew = beta = 1. DI++ / DI* depend on
the reward only through alpha r and DIDR (p* ~ q0 exp(r / beta)) only through r / beta, so
s = alpha (DI++, DI*) or s = 1 / beta (DIDR) is the same objective, and every scale of a method
runs on one compiled program.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax import sharding
from didr_jax.digits.data import NULL_LABEL, NUM_CLASSES
from didr_jax.digits.problem import Digits
from didr_jax.digits.stepping import AlignChunk, unrolled_chunk
from didr_jax.digits.sweep import objective_config
from didr_jax.objectives import ObjectiveConfig, dsm_loss
from didr_jax.training import state as st
from didr_jax.training.loop import run_chunks
from didr_jax.training.state import shardings_of
from didr_jax.training.steps import StepConfig, compile_chunk, make_fit_step, make_outer_step


def fit_phase(dg: Digits, name, loss_fn, params, opt_cfg, steps, frozen, ckpt, writer, stop, seed):
  """A supervised phase: FitState, restore, chunks of ``make_fit_step``; returns the params."""
  cfg = dg.cfg
  tx = st.make_optimizer(opt_cfg)
  with sharding.model_context(dg.mesh, dg.rules):
    state = st.init_fit_state(params=jax.jit(st.copy_tree)(params), tx=tx, seed=seed, mesh=dg.mesh)
    restored = ckpt.restore(state) if ckpt is not None else None
    state = restored if restored is not None else state
    if int(sharding.to_host(state.step)) >= steps:
      return state.params
    chunk = compile_chunk(unrolled_chunk(make_fit_step(loss_fn, tx), 1), state, frozen, None, dg.mesh, name)
    state = run_chunks(name=name, state=state, frozen=frozen, chunk=chunk, steps_per_chunk=1,
                       num_steps=steps, conds_for=lambda step: None, checkpointer=ckpt, writer=writer,
                       stop=stop, log_every_chunks=cfg.train.log_every_chunks)
  return state.params


def _minibatch(key, frozen, b: int, dg: Digits):
  idx = jax.random.randint(key, (b,), 0, frozen["y"].shape[0])
  return dg.constrain(frozen["x"][idx]), dg.constrain(frozen["y"][idx])


def train_classifier(dg: Digits, name: str, frozen, ckpt, writer, stop):
  """Cross-entropy with label smoothing ``label_smoothing`` (targets (1 - e) onehot + e / 10) on the
  train split (native 8x8), minibatches drawn with replacement. Smoothing bounds the logit margins
  the classifier learns, so log p(label | x) of a good digit is not pinned at 0 and a reward built
  on it keeps a gradient."""
  c = dg.cfg.classifiers[name]
  eps = float(c.label_smoothing)

  def loss_fn(params, key, frozen):
    x, y = _minibatch(key, frozen, c.batch, dg)
    logp = jax.nn.log_softmax(dg.logits(name, params, x).astype(jnp.float32), axis=-1)
    target = (1.0 - eps) * jax.nn.one_hot(y, NUM_CLASSES) + eps / NUM_CLASSES
    loss = -jnp.mean(jnp.sum(target * logp, axis=-1))
    return loss, {"ce_loss": loss}

  return fit_phase(dg, f"clf_{name}", loss_fn, dg.clf_init[name], c.optimizer, c.steps, frozen, ckpt,
                   writer, stop, seed=int(c.seed))


def train_reference(dg: Digits, frozen, ckpt, writer, stop):
  """eps-DSM with t ~ U{0..T-1}; labels replaced by NULL_LABEL with probability label_dropout
  (CFG's unconditional branch is the same network)."""
  r = dg.cfg.reference
  top = dg.schedule.num_train_timesteps - 1

  def loss_fn(params, key, frozen):
    kb, kd, kt, ke = jax.random.split(key, 4)
    x0, y = _minibatch(kb, frozen, r.batch, dg)
    y = jnp.where(jax.random.uniform(kd, y.shape) < r.label_dropout, NULL_LABEL, y)
    t = jax.random.randint(kt, (r.batch,), 0, top + 1).astype(jnp.float32)
    eps = dg.constrain(jax.random.normal(ke, x0.shape))
    return dsm_loss(dg.task.denoiser(params), x0, t, eps, dg.schedule, {"label": y})

  return fit_phase(dg, "reference", loss_fn, dg.unet_init, r.optimizer, r.steps, frozen, ckpt,
                   writer, stop, seed=dg.cfg.seed + 3)


def distill_generator(dg: Digits, ref_params, ckpt, writer, stop):
  """The toy's recipe: regress g(z, y) on ``ddim_steps``-step guided DDIM samples of the reference
  started from the same z (a fixed pool of pairs, drawn once, labels 0..9 in turn), clipped to the
  data range [-1, 1] as every evaluated image is. The generator starts from the reference's
  weights (it is the same UNet, read out at t*): the reference alone at t* gives the blurry
  posterior mean E[x0 | x_t*], so the regression is what makes it a sampler."""
  cfg = dg.cfg
  d = cfg.distill
  n = d.pool_size

  z = jax.device_put(jax.random.normal(jax.random.PRNGKey(cfg.seed + 11), (n,) + dg.task.sample_shape), dg.repl)
  y = jax.device_put(jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES, dg.repl)
  pool = {"z": z, "y": y, "x": jnp.clip(dg.guided_ddim_samples(ref_params, z, y), -1.0, 1.0)}

  def loss_fn(params, key, frozen):
    idx = jax.random.randint(key, (d.batch,), 0, n)
    z, y, target = (dg.constrain(frozen[k][idx]) for k in ("z", "y", "x"))
    loss = jnp.mean((dg.generate(params, z, y) - target) ** 2)
    return loss, {"distill_loss": loss}

  return fit_phase(dg, "distill", loss_fn, ref_params, d.optimizer, d.steps, pool, ckpt, writer, stop,
                   seed=cfg.seed + 5)


def reward_scale(method: str, scale) -> float:
  """frozen["reward_scale"] of a run: alpha_rew (DI++, DI*), 1 / beta (DIDR), 1 (DI)."""
  if method in ("dipp", "distar"):
    return float(scale)
  if method == "didr":
    return 1.0 / float(scale)
  return 1.0


def alignment_steps(dg: Digits, obj: ObjectiveConfig):
  cfg = dg.cfg
  gen_tx, ta_tx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  step_cfg = StepConfig(batch_size=cfg.align.batch, k_ta=cfg.align.k_ta)
  steps = make_outer_step(dg.task, obj, step_cfg, gen_tx, ta_tx, batch_sharding=dg.batch_sh)
  return steps, gen_tx, ta_tx


class Aligner:
  """Compiled alignment programs, built once: the TA program (shared by the warm-up and every run)
  and one generator program per (method, estimator), reused by every scale of that method."""

  def __init__(self, dg: Digits, frozen):
    self.dg = dg
    self.frozen = dict(frozen, reward_scale=jax.device_put(jnp.ones((), jnp.float32), dg.repl))
    self._gen = {}
    self._ta = None

  def init_state(self, gen_params, ref_params):
    cfg, dg = self.dg.cfg, self.dg
    _, gen_tx, ta_tx = alignment_steps(dg, objective_config(cfg, "di"))
    copy = jax.jit(st.copy_tree)
    return st.init_train_state(gen_params=copy(gen_params), ta_params=copy(ref_params), gen_tx=gen_tx,
                               ta_tx=ta_tx, ema=False, seed=cfg.seed + 7, mesh=dg.mesh)

  def _ta_program(self, state):
    if self._ta is None:
      steps, _, _ = alignment_steps(self.dg, objective_config(self.dg.cfg, "di"))
      self._ta = AlignChunk.compile_ta(steps, self.dg.cfg.align.k_ta, state, self.frozen,
                                       self.dg.conds(0, 1), self.dg.mesh)
    return self._ta

  def _gen_program(self, state, method: str, estimator):
    key = (method, estimator)
    if key not in self._gen:
      steps, _, _ = alignment_steps(self.dg, objective_config(self.dg.cfg, method, estimator))
      self._gen[key] = AlignChunk.compile_gen(steps, state, self.frozen, self.dg.conds(0, 1),
                                              self.dg.mesh, f"gen_update/{method}"
                                              + (f"-{estimator}" if estimator else ""))
    return self._gen[key]

  def _run(self, name, chunk, state, frozen, num_steps, ckpt, writer, stop):
    cfg = self.dg.cfg
    return run_chunks(name=name, state=state, frozen=frozen, chunk=chunk, steps_per_chunk=1,
                      num_steps=num_steps, conds_for=lambda s: self.dg.conds(s, 1), checkpointer=ckpt,
                      writer=writer, stop=stop, log_every_chunks=cfg.train.log_every_chunks)

  def warm_up(self, state, ckpt, writer, stop):
    """The TA warm-up (docs/method.md, section 2) shared by every run: ``align.ta_warmup_steps``
    steps of k_ta TA updates on the distilled generator's samples, generator frozen."""
    steps = self.dg.cfg.align.ta_warmup_steps
    with sharding.model_context(self.dg.mesh, self.dg.rules):
      restored = ckpt.restore(state) if ckpt is not None else None
      state = restored if restored is not None else state
      if int(sharding.to_host(state.step)) >= steps:
        return state
      chunk = AlignChunk(self._ta_program(state), state_shardings=shardings_of(state))
      return self._run("ta_warmup", chunk, state, self.frozen, steps, ckpt, writer, stop)

  def align(self, name: str, method: str, estimator, scale, warm_state, ckpt, writer, stop,
            num_steps: int | None = None):
    """One alignment run of ``num_steps`` (default ``align.steps``) outer steps from the warmed-up
    state; every run uses the same noise stream (rng seed + 13)."""
    cfg, dg = self.dg.cfg, self.dg
    num_steps = cfg.align.steps if num_steps is None else num_steps
    frozen = dict(self.frozen, reward_scale=jax.device_put(
        jnp.asarray(reward_scale(method, scale), jnp.float32), dg.repl))
    with sharding.model_context(dg.mesh, dg.rules):
      state = jax.jit(st.copy_tree)(warm_state)
      state = state.replace(step=jax.device_put(jnp.zeros((), jnp.int32), dg.repl),
                            rng=jax.device_put(jax.random.PRNGKey(cfg.seed + 13), dg.repl))
      restored = ckpt.restore(state) if ckpt is not None else None
      state = restored if restored is not None else state
      if int(sharding.to_host(state.step)) >= num_steps:
        return state
      chunk = AlignChunk(self._ta_program(state), self._gen_program(state, method, estimator))
      return self._run(name, chunk, state, frozen, num_steps, ckpt, writer, stop)
