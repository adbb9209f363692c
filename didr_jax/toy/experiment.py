"""The toy pipeline: reference DSM -> generator distillation -> every alignment method -> metrics.

Each phase checkpoints into ``workdir/checkpoints/<phase>`` and resumes from it; a finished method
leaves ``workdir/methods/<name>.npz`` so a rerun of the same command skips it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from didr_jax import log
from flax import nnx

from didr_jax import sharding
from didr_jax.config_checks import fail
from didr_jax.diffusion import ddim_sample, make_schedule
from didr_jax.objectives import ObjectiveConfig, dsm_loss, method_and_drs, mixture_drs, variance_table
from didr_jax.training import state as st
from didr_jax.training.checkpoint import Checkpointer, closing_all, phase_checkpointers
from didr_jax.training.drs_table import persisted_variance_table
from didr_jax.training.loop import StopSignal, run_chunks, submit_job, wait_for_jobs
from didr_jax.training.metrics import MetricWriter
from didr_jax.training.steps import StepConfig, compile_chunk, make_fit_step, make_outer_step, scan_chunk
from didr_jax.training.task import Task
from didr_jax.toy import drs_bias, report
from didr_jax.toy.networks import Denoiser, make_generator
from didr_jax.toy.problem import ToyProblem, sample_metrics, target_summary

TABLE_SAMPLES, TABLE_POINTS = 16_384, 64    # variance table: q0 samples and t points



def identities(cfg) -> dict:
  """What each phase's checkpoint depends on (a mismatch is refused before training)."""
  d = cfg.to_dict()
  prior = {k: d["toy"][k] for k in ("means", "stds", "weights")}
  # The step count is not part of a phase's identity: raising it continues a finished run.
  no_steps = lambda group: {k: v for k, v in d[group].items() if k != "steps"}
  ref = {"seed": d["seed"], "prior": prior, "schedule": d["schedule"], "network": d["network"],
         "reference": no_steps("reference")}
  distill = dict(ref, generator=d["generator"], distill=no_steps("distill"),
                 reference_steps=d["reference"]["steps"])
  out = {"reference": ref, "distill": distill}
  for m in cfg.methods:
    out[m] = dict(distill, toy=d["toy"], align=no_steps("align"), objective=d["objective"], method=m,
                  distill_steps=d["distill"]["steps"])
  return out


def objective_config(cfg, method: str) -> ObjectiveConfig:
  """ObjectiveConfig of a toy method name (``method_and_drs``: ``didr`` runs ``objective.drs``,
  ``didr-<estimator>`` another estimator); ValueError for an unknown name."""
  name, drs = method_and_drs(method, cfg.objective.drs)
  return ObjectiveConfig.from_group(cfg.objective, method=name, drs=drs, beta=float(cfg.toy.beta))


def snis_objective(cfg) -> ObjectiveConfig:
  """DIDR with the snis estimator and the config's settings (the bias tables measure it)."""
  return dataclasses.replace(objective_config(cfg, "didr"), drs="snis")


class Toy:
  """Networks, task and shardings of the toy, built once per run."""

  def __init__(self, cfg, devices=None):
    self.cfg = cfg
    self.problem = ToyProblem.from_config(cfg.toy)
    self.schedule = make_schedule(cfg.schedule)
    self.mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
    self.rules = sharding.get_rules(cfg.mesh.rules)
    d = self.problem.dim
    n, g = cfg.network, cfg.generator
    self.den_graph, self.ref_init = sharding.create_sharded(
        lambda: Denoiser(d, n.width, n.depth, n.time_dim, rngs=nnx.Rngs(cfg.seed)), self.mesh, self.rules)
    self.gen_graph, self.gen_init = sharding.create_sharded(
        lambda: make_generator(d, g.kind, g.width, g.depth, rngs=nnx.Rngs(cfg.seed + 1)), self.mesh, self.rules)
    self.batch_sh = sharding.batch_sharding(self.mesh, 2)
    problem = self.problem
    self.task = Task(
        schedule=self.schedule, prediction="eps", sample_shape=(d,),
        generator_apply=lambda p, z, c: nnx.merge(self.gen_graph, p)(z),
        network_apply=lambda p, x, t, c: nnx.merge(self.den_graph, p)(x, t),
        reward_apply=lambda frozen, x0, c: problem.reward(x0),
        ta_t_range=tuple(cfg.align.ta_t_range), gen_t_range=tuple(cfg.align.gen_t_range),
        exact_drs=lambda x, t, c: mixture_drs(problem.mixture, problem.log_mgf, x,
                                              *self.schedule.alpha_sigma(t)))

  def constrain(self, x):
    return jax.lax.with_sharding_constraint(x, self.batch_sh)

  def ddim_grid(self, steps: int):
    return jnp.linspace(1.0, self.cfg.reference.t_min, steps)

  def reference_samples(self, ref_params, z, steps: int):
    return ddim_sample(self.task.denoiser(ref_params), z, self.ddim_grid(steps), self.schedule)

  def generate(self, gen_params, z):
    return self.task.generator_apply(gen_params, z, None)


def _fit_phase(toy: Toy, name, loss_fn, params, opt_cfg, steps, frozen, ckpt: Checkpointer, writer, stop):
  cfg = toy.cfg
  tx = st.make_optimizer(opt_cfg)
  with sharding.model_context(toy.mesh, toy.rules):
    state = st.init_fit_state(params=params, tx=tx, seed=cfg.seed, mesh=toy.mesh)
    restored = ckpt.restore(state)
    state = restored if restored is not None else state
    if int(sharding.to_host(state.step)) >= steps:
      return state.params
    chunk = compile_chunk(scan_chunk(make_fit_step(loss_fn, tx), cfg.train.steps_per_chunk),
                          state, frozen, None, toy.mesh, name)
    state = run_chunks(name=name, state=state, frozen=frozen, chunk=chunk,
                       steps_per_chunk=cfg.train.steps_per_chunk, num_steps=steps,
                       conds_for=lambda step: None, checkpointer=ckpt, writer=writer, stop=stop,
                       log_every_chunks=cfg.train.log_every_chunks)
  return state.params


def train_reference(toy: Toy, ckpt, writer, stop):
  cfg, problem, schedule = toy.cfg, toy.problem, toy.schedule
  b = cfg.reference.batch

  def loss_fn(params, key, frozen):
    kx, kt, ke = jax.random.split(key, 3)
    x0 = toy.constrain(problem.sample_q0(kx, b))
    t = jax.random.uniform(kt, (b,), minval=cfg.reference.t_min, maxval=1.0)
    eps = toy.constrain(jax.random.normal(ke, x0.shape))
    return dsm_loss(toy.task.denoiser(params), x0, t, eps, schedule)

  return _fit_phase(toy, "reference", loss_fn, toy.ref_init, cfg.reference.optimizer,
                    cfg.reference.steps, {}, ckpt, writer, stop)


def distill_generator(toy: Toy, ref_params, ckpt, writer, stop):
  """Regress g(z) on 30-step DDIM samples of the reference started from the same z.

  The (z, DDIM(z)) pairs are drawn once into a fixed pool (deterministic, so a resume sees the
  same pool) and minibatches are sampled from it: 30 reference calls per pair instead of per step.
  """
  cfg = toy.cfg
  b, d, n = cfg.distill.batch, toy.problem.dim, cfg.distill.pool_size
  repl = sharding.replicated(toy.mesh)

  @jax.jit
  def make_pool(ref):
    z = jax.lax.with_sharding_constraint(jax.random.normal(jax.random.PRNGKey(cfg.seed + 11), (n, d)),
                                         toy.batch_sh)
    x = toy.reference_samples(ref, z, cfg.distill.ddim_steps)
    return {"z": jax.lax.with_sharding_constraint(z, repl), "x": jax.lax.with_sharding_constraint(x, repl)}

  frozen = make_pool(ref_params)

  def loss_fn(params, key, frozen):
    idx = jax.random.randint(key, (b,), 0, n)
    z, target = toy.constrain(frozen["z"][idx]), toy.constrain(frozen["x"][idx])
    loss = jnp.mean((toy.generate(params, z) - target) ** 2)
    return loss, {"distill_loss": loss}

  return _fit_phase(toy, "distill", loss_fn, toy.gen_init, cfg.distill.optimizer, cfg.distill.steps,
                    frozen, ckpt, writer, stop)


def drs_table(toy: Toy, ref_params, workdir: str):
  """The snis variance table of the learned reference on q0 samples, kept in the workdir."""
  cfg = toy.cfg
  key = jax.random.PRNGKey(cfg.seed + 300)
  compute = jax.jit(lambda p: variance_table(
      toy.task.denoiser(p), toy.schedule, toy.problem.sample_q0(key, TABLE_SAMPLES), None,
      jax.random.fold_in(key, 1), jnp.linspace(cfg.reference.t_min, 1.0, TABLE_POINTS)))
  return persisted_variance_table(os.path.join(workdir, "drs_table.json"),
                                  lambda: compute(jax.tree.map(sharding.to_host, ref_params)), toy.mesh)


def align(toy: Toy, method: str, ref_params, gen_params, ckpt, writer, stop, table=None):
  cfg = toy.cfg
  obj = objective_config(cfg, method)
  gen_tx, ta_tx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  step_cfg = StepConfig(batch_size=cfg.align.batch, k_ta=cfg.align.k_ta, ema_decay=cfg.align.ema_decay)
  outer = make_outer_step(toy.task, obj, step_cfg, gen_tx, ta_tx, batch_sharding=toy.batch_sh).outer
  frozen = {"ref": ref_params}
  if obj.needs_drs_table:
    frozen["drs_table"] = table
  with sharding.model_context(toy.mesh, toy.rules):
    copy = jax.jit(st.copy_tree)
    state = st.init_train_state(gen_params=copy(gen_params), ta_params=copy(ref_params), gen_tx=gen_tx,
                                ta_tx=ta_tx, ema=cfg.align.ema_decay > 0, seed=cfg.seed + 7, mesh=toy.mesh)
    restored = ckpt.restore(state) if ckpt is not None else None
    state = restored if restored is not None else state
    if int(sharding.to_host(state.step)) < cfg.align.steps:
      chunk = compile_chunk(scan_chunk(outer, cfg.train.steps_per_chunk), state, frozen, None,
                            toy.mesh, f"align/{method}")
      state = run_chunks(name=method, state=state, frozen=frozen, chunk=chunk,
                         steps_per_chunk=cfg.train.steps_per_chunk, num_steps=cfg.align.steps,
                         conds_for=lambda step: None, checkpointer=ckpt, writer=writer, stop=stop,
                         log_every_chunks=cfg.train.log_every_chunks)
  return state


def align_methods(toy: Toy, pool, ref_params, gen_params, ckpts, writer, stop, table, eval_z,
                  workdir) -> dict:
  """{method: future of (samples of the final generator, wall seconds)} for every method of the
  config, queued on ``pool`` (``train.parallel_methods`` threads).

  The methods are independent programs whose small steps keep about one CPU core busy each, so
  threads (XLA releases the GIL while a program runs) run them side by side. A finished method
  leaves ``methods/<name>.npz`` and is reused on a rerun.
  """
  cfg = toy.cfg

  def one(method):
    done = os.path.join(workdir, "methods", f"{method}.npz")
    if os.path.exists(done):
      with np.load(done) as f:
        log.info("[%s] already finished; reusing %s", method, done)
        return f["samples"], float(f["wall_s"])
    t1 = time.time()
    state = align(toy, method, ref_params, gen_params, ckpts[method], writer, stop, table)
    method_samples = sharding.to_host(jax.jit(toy.generate)(state.gen_params, eval_z))
    wall = time.time() - t1
    if jax.process_index() == 0:
      np.savez(done + ".tmp.npz", samples=method_samples, wall_s=wall)
      os.replace(done + ".tmp.npz", done)
    return method_samples, wall

  os.makedirs(os.path.join(workdir, "methods"), exist_ok=True)
  # longest first (the posterior chains of snis / hybrid), so no thread idles at the end
  order = sorted(cfg.methods, key=lambda m: objective_config(cfg, m).drs not in ("snis", "hybrid"))
  futures = {m: submit_job(pool, stop, one, m) for m in order}
  return {m: futures[m] for m in cfg.methods}


def estimator_bias(toy: Toy, ref_params, table, key) -> dict:
  """E[T_est] / E[T_exact] per t-bin for every DRS estimator (DRP at each eval K, snis, hybrid),
  with the run's learned reference and with the exact one, x_t from q_t (x0 ~ q0).

  The DRS is an expectation under the reference posterior, so an estimator is judged where the
  reference has its mass, independently of where the aligned generators ended up.
  """
  cfg, problem = toy.cfg, toy.problem
  base = dataclasses.replace(snis_objective(cfg), snis_rows=0)   # every row
  variants = {}
  if problem.differentiable:     # the DRP (and hybrid) need the reward's gradient
    variants = {f"drp_k{int(k)}": dataclasses.replace(base, drs="drp", drp_k=int(k), drp_t_max=-1.0)
                for k in cfg.eval.drp_bias_ks}
    variants["hybrid"] = dataclasses.replace(base, drs="hybrid")
  variants["snis"] = base
  learned = toy.task.denoiser(jax.tree.map(sharding.to_host, ref_params))   # a local copy
  learned_table = None if table is None else jax.tree.map(sharding.to_host, table)
  exact_table = (drs_bias.exact_table(problem, toy.schedule, jax.random.fold_in(key, 1))
                 if base.needs_drs_table else None)
  kw = dict(t_range=tuple(cfg.eval.bias_t_range), bins=cfg.eval.t_bins,
            per_bin=cfg.eval.drp_bias_samples // cfg.eval.t_bins)
  out = {"states": "x_t = a x0 + s eps, x0 ~ q0", "beta": float(cfg.toy.beta),
         "metric": "ratio = E[T_est] / E[T_exact] per t-bin, T = (s^2/a) DRS; integrated_bias = "
                   "sum(E T_est - E T_exact) / sum(E T_exact); rel_std = sqrt(E Var T_est) / rms T_exact",
         "learned_reference": {}, "exact_reference": {}}
  t0 = time.time()
  for name, obj in variants.items():
    out["learned_reference"][name] = drs_bias.bias_per_bin(obj, problem, toy.schedule,
                                                           learned_table, key, ref=learned, **kw)
    out["exact_reference"][name] = drs_bias.bias_per_bin(obj, problem, toy.schedule, exact_table,
                                                         key, **kw)
  log.info("estimator bias measured in %.0fs", time.time() - t0)
  return out


def run(cfg, workdir: str) -> dict:
  """The whole toy experiment; writes config.json, results.{json,md}, samples.npz, densities.png,
  drp_bias.json, metrics.jsonl into ``workdir``."""
  if jax.process_count() > 1 and cfg.train.parallel_methods > 1:
    fail("train.parallel_methods", f"{cfg.train.parallel_methods} runs methods in threads, whose "
                                   "collectives would interleave across processes; use 1 with several processes")
  os.makedirs(workdir, exist_ok=True)
  ids = identities(cfg)
  ckpts = phase_checkpointers(workdir, ids, cfg.checkpoint)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  writer = MetricWriter(workdir)
  toy = Toy(cfg)
  eval_z = jax.jit(lambda: jax.random.normal(jax.random.PRNGKey(cfg.seed + 100),
                                            (cfg.eval.num_samples, toy.problem.dim)),
                   out_shardings=toy.batch_sh)()
  results = {"target": target_summary(toy.problem), "methods": {}}
  samples = {}
  with StopSignal() as stop, closing_all(ckpts.values()):
    t0 = time.time()
    ref_params = train_reference(toy, ckpts["reference"], writer, stop)
    gen_params = distill_generator(toy, ref_params, ckpts["distill"], writer, stop)
    results["pretraining_wall_s"] = time.time() - t0
    samples["reference"] = sharding.to_host(jax.jit(lambda p, z: toy.reference_samples(
        p, z, cfg.distill.ddim_steps))(ref_params, eval_z))
    samples["generator_init"] = sharding.to_host(jax.jit(toy.generate)(gen_params, eval_z))
    for name in ("reference", "generator_init"):
      results[name] = sample_metrics(toy.problem, samples[name])
    didr = [m for m in cfg.methods if m.startswith("didr")]
    table = (drs_table(toy, ref_params, workdir)
             if didr and snis_objective(cfg).needs_drs_table else None)
    t1 = time.time()
    with concurrent.futures.ThreadPoolExecutor(cfg.train.parallel_methods) as pool:
      queued = align_methods(toy, pool, ref_params, gen_params, ckpts, writer, stop, table, eval_z,
                             workdir)
      # the bias tables need only the reference: last in the queue, beside the last method
      bias_job = (submit_job(pool, stop, estimator_bias, toy, ref_params, table,
                             jax.random.PRNGKey(cfg.seed + 200)) if didr else None)
      jobs = list(queued.values()) + ([bias_job] if bias_job is not None else [])
      results_of = dict(zip(jobs, wait_for_jobs(jobs, pool)))
      aligned = {m: results_of[f] for m, f in queued.items()}
      bias = results_of[bias_job] if bias_job is not None else None
    results["alignment_wall_s"] = time.time() - t1
    for method, (method_samples, wall) in aligned.items():
      samples[method] = method_samples
      results["methods"][method] = dict(sample_metrics(toy.problem, method_samples), wall_s=wall)
    if bias is not None and jax.process_index() == 0:
      with open(os.path.join(workdir, "drp_bias.json"), "w") as f:
        json.dump(bias, f, indent=2)
  writer.close()
  if jax.process_index() == 0:
    report.write_all(workdir, toy.problem, results, samples)
  return results
