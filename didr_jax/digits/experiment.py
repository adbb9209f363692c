"""The digits experiment: classifiers -> reference DSM -> generator distillation -> shared TA
warm-up -> every sweep run -> metrics, table, Pareto plot, sample grids, samples.npz.

Each phase checkpoints into ``workdir/checkpoints/<phase>`` and resumes from it; a finished run
leaves ``workdir/runs/<name>.npz`` (its samples) so a rerun of the same command skips it.

DRS estimators are the trainer's (``sweep.ESTIMATOR_OBJECTIVES``); the frozen inputs they need
beyond the reference and the reward classifier (the snis variance table) are built in
:func:`alignment_frozen`.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax import log
from didr_jax.config_checks import fail
from didr_jax.digits import evaluation as ev
from didr_jax.digits import phases, report
from didr_jax.digits.data import to_native
from didr_jax.digits.problem import CLASSIFIERS, Digits
from didr_jax.digits.sweep import default_runs, objective_config, run_specs
from didr_jax.objectives.posterior_drs import variance_table
from didr_jax.training.checkpoint import closing_all, phase_checkpointers
from didr_jax.training.drs_table import persisted_variance_table
from didr_jax.training.loop import StopSignal, submit_job, wait_for_jobs
from didr_jax.training.metrics import MetricWriter


def identities(cfg) -> dict:
  """What each phase's checkpoint depends on (a mismatch is refused before training). Step counts
  are left out of a phase's own identity (raising one continues it) but enter the phases after."""
  d = cfg.to_dict()
  no_steps = lambda group: {k: v for k, v in group.items() if k != "steps"}
  base = {"seed": d["seed"], "data": d["data"]}
  out = {f"clf_{n}": dict(base, classifier=no_steps(d["classifiers"][n])) for n in CLASSIFIERS}
  ref = dict(base, schedule=d["schedule"], unet=d["unet"], reference=no_steps(d["reference"]))
  distill = dict(ref, generator=d["generator"], distill=no_steps(d["distill"]),
                 reference_steps=d["reference"]["steps"], cfg_w=d["objective"]["cfg_w"])
  align = {k: v for k, v in d["align"].items() if k not in ("steps", "ta_warmup_steps")}
  warmup = dict(distill, align=align, distill_steps=d["distill"]["steps"],
                reward_classifier=d["classifiers"]["reward"])
  out.update(reference=ref, distill=distill, ta_warmup=warmup)
  for spec in run_specs(cfg):
    out[f"run_{spec.name}"] = dict(warmup, objective=d["objective"], method=spec.method,
                                   scale=spec.scale, estimator=spec.estimator,
                                   ta_warmup_steps=d["align"]["ta_warmup_steps"])
  return out


TABLE_POINTS = 64


def alignment_frozen(dg: Digits, ref_params, reward_params, workdir: str) -> dict:
  """The frozen inputs of every alignment step (``reward_scale`` is added per run); with
  ``objective.snis_variance='table'`` and a posterior-sample estimator in the sweep, the chains'
  variance table of the guided reference on the train images, kept in ``workdir/drs_table.json``."""
  frozen = {"ref": ref_params, "clf": reward_params}
  if any(objective_config(dg.cfg, s.method, s.estimator).needs_drs_table for s in run_specs(dg.cfg)):
    key = jax.random.PRNGKey(dg.cfg.seed + 300)
    data = dg.train_data()
    lo, hi = dg.task.gen_t_range

    @jax.jit
    def compute(ref):
      guided = dg.task.denoiser(ref, float(dg.cfg.objective.cfg_w))
      return variance_table(lambda x, t, c: guided(x, t, c, True), dg.schedule, data["x"],
                            {"label": data["y"]}, key, jnp.linspace(lo, hi, TABLE_POINTS))

    frozen["drs_table"] = persisted_variance_table(os.path.join(workdir, "drs_table.json"),
                                                   lambda: compute(ref_params), dg.mesh)
  return frozen


class Scorer:
  """Classifier outputs and features of native 8x8 images, and every metric against real test."""

  def __init__(self, dg: Digits, clf_params: dict):
    self.dg, self.cfg = dg, dg.cfg
    split = dg.split

    @jax.jit
    def outputs(params, images, labels):
      r, h = dg.logits("reward", params["reward"], images), dg.logits("heldout", params["heldout"], images)
      return {"reward_logp": dg.log_prob("reward", params["reward"], images, labels),
              "heldout_logp": dg.log_prob("heldout", params["heldout"], images, labels),
              "reward_pred": jnp.argmax(r, -1), "heldout_pred": jnp.argmax(h, -1),
              "features": dg.features(params["features"], images)}

    self._outputs = lambda images, labels: {k: np.asarray(v, np.float64) for k, v in outputs(
        clf_params, jnp.asarray(images)[..., None], jnp.asarray(labels)).items()}
    self.train_images = split.train_images[..., 0]
    real = self.real_outputs = self._outputs(split.test_images[..., 0], split.test_labels)
    self.real = {"features": real["features"], "labels": split.test_labels}
    self.off_threshold = ev.off_manifold_threshold(split.test_images[..., 0], self.train_images,
                                                   float(self.cfg.eval.off_manifold_quantile))
    self.kept = {}

  def paired(self, a: str, b: str, seed: int) -> dict:
    ka, kb = self.kept[a], self.kept[b]
    return ev.paired_bootstrap(ka["features"], ka["heldout_logp"], kb["features"], kb["heldout_logp"],
                               self.real["features"], n_boot=int(self.cfg.eval.bootstrap), seed=seed)

  def score(self, images, labels, keep: str | None = None) -> dict:
    """Every metric of one set of samples; ``keep``: remember the outputs under that name (for
    :meth:`paired`)."""
    out = self._outputs(images, labels)
    if keep is not None:
      self.kept[keep] = out
    return ev.sample_metrics(images=images, labels=labels, reward_logp=out["reward_logp"],
                             heldout_logp=out["heldout_logp"], reward_pred=out["reward_pred"],
                             heldout_pred=out["heldout_pred"], features=out["features"], real=self.real,
                             train_images=self.train_images, knn_k=int(self.cfg.eval.knn_k),
                             off_threshold=self.off_threshold)

  def test_accuracy(self, name: str) -> float:
    """Accuracy of classifier ``name`` (reward | heldout) on the real test images."""
    return float(np.mean(self.real_outputs[f"{name}_pred"] == self.dg.split.test_labels))


def matched_train_subset(split, seed: int):
  """Train images with the test set's label counts (the FD / precision-recall floor of real data)."""
  rng = np.random.default_rng(seed)
  idx = np.concatenate([rng.choice(np.flatnonzero(split.train_labels == c), int(np.sum(split.test_labels == c)),
                                   replace=False) for c in np.unique(split.test_labels)])
  return split.train_images[idx, ..., 0], split.train_labels[idx]


def trainer_tbin_metrics(jsonl_path: str, run: str) -> dict:
  """Means over a run's logged chunks of the per-t-bin metrics the trainer logs
  (``<run>/<metric>/t<lo>-<hi>``, e.g. drs_to_kl), the last logging of each step winning."""
  rows = {}
  if os.path.exists(jsonl_path):
    with open(jsonl_path) as f:
      for line in f:
        row = json.loads(line)
        keys = {k: v for k, v in row.items() if k.startswith(f"{run}/") and "/t" in k[len(run) + 1:]}
        if keys:
          rows[row["step"]] = keys
  out = {}
  for keys in rows.values():
    for k, v in keys.items():
      out.setdefault(k[len(run) + 1:], []).append(v)
  return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def cached_drs_check(dg: Digits, ref_params, reward_params, frozen: dict, workdir: str) -> dict:
  """drs_check.drs_check for every DIDR estimator and beta of the sweep, kept in ``drs_check.json``."""
  from didr_jax.digits.drs_check import drs_check
  e, s = dg.cfg.eval, dg.cfg.sweep
  settings = {"states_per_bin": int(e.drs_check_states), "chains": int(e.drs_check_chains),
              "chain_steps": int(e.drs_check_steps), "betas": [float(b) for b in s.didr_betas],
              "estimators": list(s.didr_estimators), "objective": dg.cfg.objective.to_dict(),
              "version": 5}      # 5: the trainer's estimators against the trainer's chain
  path = os.path.join(workdir, "drs_check.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("settings") == settings:
      return cached["result"]
  result = drs_check(dg, ref_params, reward_params, settings["betas"], settings["estimators"],
                     states_per_bin=settings["states_per_bin"], chains=settings["chains"],
                     chain_steps=settings["chain_steps"], seed=dg.cfg.seed + 23,
                     drs_table=frozen.get("drs_table"))
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"settings": settings, "result": result}, f, indent=2)
  return result


def _cost_rank(spec) -> int:
  """Sweep runs by cost, dearest first: posterior chains, the DRP chain, DI*, DI++, DI."""
  if spec.method == "didr":
    return 0 if spec.estimator in ("snis", "hybrid") else 1
  return {"distar": 2, "dipp": 3}.get(spec.method, 4)


def align_runs(aligner, specs, warm, ckpts, writer, stop, generate, native, workdir, pool) -> list:
  """Futures of {run name: (native samples, wall seconds)} covering ``specs``, queued on ``pool``.

  Runs sharing a compiled generator program (one method and estimator) are one job, so each
  program compiles once; the jobs are queued dearest first, so no thread idles at the end. Runs
  are independent programs that keep about one core busy each (and compile on one), so threads
  (XLA releases the GIL while a program runs) run them side by side. A finished run leaves
  ``runs/<name>.npz`` and is reused on a rerun.
  """
  cfg = aligner.dg.cfg
  main = jax.process_index() == 0

  def one(spec):
    done = os.path.join(workdir, "runs", f"{spec.name}.npz")
    if os.path.exists(done):
      with np.load(done) as f:
        if int(f["steps"]) == cfg.align.steps:
          log.info("[%s] already finished; reusing %s", spec.name, done)
          return f["images"], float(f["wall_s"])
    t1 = time.time()
    state = aligner.align(spec.name, spec.method, spec.estimator, spec.scale, warm,
                          ckpts[f"run_{spec.name}"], writer, stop)
    images = native(generate(state.gen_params))
    wall = time.time() - t1
    if main:
      np.savez(done + ".tmp.npz", images=images, wall_s=wall, steps=cfg.align.steps)
      os.replace(done + ".tmp.npz", done)
    return images, wall

  def group(members):
    return {spec.name: one(spec) for spec in members}

  by_program = lambda spec: (_cost_rank(spec), spec.method, spec.estimator or "")
  return [submit_job(pool, stop, group, list(members))
          for _, members in itertools.groupby(sorted(specs, key=by_program), key=by_program)]


def run(cfg, workdir: str) -> dict:
  if jax.process_count() > 1 and cfg.train.parallel_runs > 1:
    fail("train.parallel_runs", f"{cfg.train.parallel_runs} runs the sweep in threads, whose collectives "
                                "would interleave across processes; use 1 with several processes")
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  ids = identities(cfg)
  ckpts = phase_checkpointers(workdir, ids, cfg.checkpoint)
  main = jax.process_index() == 0
  if main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  writer = MetricWriter(workdir)
  start, load_at_start = time.time(), [round(v, 2) for v in os.getloadavg()]
  stages = {}
  dg = Digits(cfg)
  specs = run_specs(cfg)
  eval_labels = dg.split.test_labels
  eval_z = jax.device_put(jax.random.normal(jax.random.PRNGKey(cfg.eval.seed),
                                            (len(eval_labels),) + dg.task.sample_shape), dg.repl)
  eval_y = jax.device_put(jnp.asarray(eval_labels), dg.repl)
  native = lambda x: np.asarray(jnp.clip(to_native(x), -1.0, 1.0))[..., 0]
  generate = jax.jit(lambda p: dg.generate(p, eval_z, eval_y))
  samples = {}
  with StopSignal() as stop, closing_all(ckpts.values()):
    t0 = time.time()
    train_native = {"x": jax.device_put(jnp.asarray(dg.split.train_images), dg.repl),
                    "y": jax.device_put(jnp.asarray(dg.split.train_labels), dg.repl)}
    clf = {n: phases.train_classifier(dg, n, train_native, ckpts[f"clf_{n}"], writer, stop) for n in CLASSIFIERS}
    stages["classifiers"] = time.time() - t0
    t0 = time.time()
    ref = phases.train_reference(dg, dg.train_data(), ckpts["reference"], writer, stop)
    stages["reference"] = time.time() - t0
    t0 = time.time()
    gen = phases.distill_generator(dg, ref, ckpts["distill"], writer, stop)
    stages["distill"] = time.time() - t0
    samples["reference"] = native(dg.guided_ddim_samples(ref, eval_z, eval_y))
    samples["generator_init"] = native(generate(gen))
    t0 = time.time()
    frozen = alignment_frozen(dg, ref, clf["reward"], workdir)
    aligner = phases.Aligner(dg, frozen)
    warm = aligner.warm_up(aligner.init_state(gen, ref), ckpts["ta_warmup"], writer, stop)
    stages["ta_warmup"] = time.time() - t0
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(cfg.train.parallel_runs) as pool:
      jobs = align_runs(aligner, specs, warm, ckpts, writer, stop, generate, native, workdir, pool)
      if cfg.eval.drs_check_states > 0:   # needs only the reference: beside the last runs

        def check():
          t1 = time.time()
          return cached_drs_check(dg, ref, clf["reward"], frozen, workdir), time.time() - t1
        jobs.append(submit_job(pool, stop, check))
      done = wait_for_jobs(jobs, pool)
    stages["alignment"] = time.time() - t0
    drs = None
    if cfg.eval.drs_check_states > 0:
      drs, stages["drs_check"] = done.pop()
    aligned = {name: out for group in done for name, out in group.items()}
    walls = {}
    for spec in specs:
      samples[spec.name], walls[spec.name] = aligned[spec.name]
  writer.close()
  t0 = time.time()
  scorer = Scorer(dg, clf)
  results = {"variant": cfg.variant,
             "data": {"n_train": int(len(dg.split.train_labels)), "n_test": int(len(eval_labels)),
                      "resolution": dg.resolution, "n_eval": int(len(eval_labels))},
             "classifiers": {n: {"test_accuracy": scorer.test_accuracy(n)} for n in ("reward", "heldout")},
             "baselines": {}, "runs": {}, "default_runs": default_runs(cfg)}
  train_x, train_y = matched_train_subset(dg.split, cfg.seed + 17)
  results["baselines"]["real_train_subset"] = scorer.score(train_x, train_y)
  for name in ("reference", "generator_init"):
    results["runs"][name] = dict(scorer.score(samples[name], eval_labels), method=name, label=name)
  for spec in specs:
    m = scorer.score(samples[spec.name], eval_labels, keep=spec.name)
    results["runs"][spec.name] = dict(m, method=spec.method, label=spec.label, param=spec.param,
                                      scale=spec.scale, estimator=spec.estimator, wall_s=walls[spec.name],
                                      trainer_tbins=trainer_tbin_metrics(writer.jsonl_path, spec.name))
  results["pareto"] = report.pareto_analysis(results["runs"])
  # DIDR (every estimator) against DI++ and DI*, run by run: paired-bootstrap differences
  results["paired"] = {f"{a.name} - {b.name}": scorer.paired(a.name, b.name, cfg.seed + 31)
                       for a in specs if a.method == "didr" for b in specs if b.method in ("dipp", "distar")}
  if drs is not None:
    results["drs_check"] = drs
  stages["evaluation"] = time.time() - t0
  results["stage_wall_s"] = dict(stages, **{f"run {k}": v for k, v in walls.items()})
  results["total_wall_s"] = time.time() - start     # this invocation (a resumed one skips what is done)
  results["machine"] = {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                        "load_average": [round(v, 2) for v in os.getloadavg()]}
  if main:
    all_samples = {k: (v, eval_labels) for k, v in samples.items()}
    all_samples["real_test"] = (dg.split.test_images[..., 0], eval_labels)
    report.write_all(workdir, results, all_samples, int(cfg.eval.grid_per_class))
  return results
