"""Fail-fast validation of the digits config: one line naming the field, before anything is built."""
from __future__ import annotations

from didr_jax.config_checks import check_mesh, fail
from didr_jax.digits.data import RESOLUTIONS
from didr_jax.digits.networks import CLASSIFIER_KINDS
from didr_jax.digits.sweep import estimator_objective, objective_config, run_specs
from didr_jax.errors import ConfigError


def _positive_ints(cfg, names):
  for name in names:
    group, *rest = name.split(".")
    value = cfg[group]
    for key in rest:
      value = value[key]
    if not isinstance(value, int) or value < 1:
      fail(name, f"must be an integer >= 1, got {value!r}")


def _scales(field, values, default, default_field):
  if not values:
    fail(field, "needs at least one value")
  if any(not isinstance(v, (int, float)) or not v > 0 for v in values):
    fail(field, f"every value must be > 0, got {values}")
  if len(set(values)) != len(values):
    fail(field, f"lists a value twice: {values}")
  if float(default) not in [float(v) for v in values]:
    fail(default_field, f"{default} is not one of {field}={values}")


def validate(cfg) -> None:
  if not 0.05 <= cfg.data.test_fraction <= 0.5:
    fail("data.test_fraction", f"must be in [0.05, 0.5], got {cfg.data.test_fraction}")
  if cfg.data.resolution not in RESOLUTIONS:
    fail("data.resolution", f"must be one of {RESOLUTIONS}, got {cfg.data.resolution}")
  if cfg.schedule.kind != "discrete_vp":
    fail("schedule.kind", f"the digits UNet takes integer timesteps: use discrete_vp, got {cfg.schedule.kind!r}")
  _positive_ints(cfg, ["unet.width", "unet.layers_per_block", "unet.cross_attention_dim",
                       "unet.label_tokens", "unet.norm_groups", "reference.steps", "reference.batch",
                       "distill.steps", "distill.batch", "distill.ddim_steps", "distill.pool_size",
                       "align.steps", "align.batch", "align.k_ta", "eval.knn_k", "eval.bootstrap",
                       "eval.grid_per_class", "train.log_every_chunks", "train.parallel_runs",
                       "checkpoint.every_steps",
                       "checkpoint.keep"])
  if cfg.unet.width % cfg.unet.norm_groups:
    fail("unet.norm_groups", f"{cfg.unet.norm_groups} must divide unet.width={cfg.unet.width}")
  heads = cfg.unet.heads
  if len(heads) != (2 if cfg.data.resolution == 8 else 3):
    fail("unet.heads", f"needs one entry per UNet level ({2 if cfg.data.resolution == 8 else 3}), got {heads}")
  for name in ("reward", "heldout", "features"):
    c = cfg.classifiers[name]
    if c.kind not in CLASSIFIER_KINDS:
      fail(f"classifiers.{name}.kind", f"unknown {c.kind!r}; choose from {CLASSIFIER_KINDS}")
    _positive_ints(cfg, [f"classifiers.{name}.{k}" for k in ("width", "feature_dim", "steps", "batch")])
    if not 0 <= c.label_smoothing < 1:
      fail(f"classifiers.{name}.label_smoothing", f"must be in [0, 1), got {c.label_smoothing}")
  rw, ho = cfg.classifiers.reward, cfg.classifiers.heldout
  if rw.kind == ho.kind:
    fail("classifiers.heldout.kind", f"the held-out classifier needs another architecture than the reward's ({rw.kind!r})")
  if rw.seed == ho.seed:
    fail("classifiers.heldout.seed", f"the held-out classifier needs another seed than the reward's ({rw.seed})")
  if not 0 <= cfg.reference.label_dropout < 1:
    fail("reference.label_dropout", f"must be in [0, 1), got {cfg.reference.label_dropout}")
  top = cfg.schedule.num_train_timesteps - 1
  if not 0 < cfg.generator.label_t <= top:
    fail("generator.label_t", f"must be in (0, {top}], got {cfg.generator.label_t}")
  for name in ("align.ta_t_range", "align.gen_t_range"):
    lo, hi = cfg.align[name.split(".")[1]]
    if not 0 <= lo < hi <= top:
      fail(name, f"needs 0 <= lo < hi <= {top}, got {(lo, hi)}")
  if cfg.align.ta_warmup_steps < 0:
    fail("align.ta_warmup_steps", f"must be >= 0, got {cfg.align.ta_warmup_steps}")
  o = cfg.objective
  if o.cfg_w < 0:
    fail("objective.cfg_w", f"must be >= 0, got {o.cfg_w}")
  if "drs" in o:
    fail("objective.drs", "is set per run by sweep.didr_estimators; remove it")
  for key in ("method", "alpha_rew", "beta"):
    if key in o:
      fail(f"objective.{key}", "is set per run by the sweep; remove it")
  s = cfg.sweep
  _scales("sweep.dipp_scales", s.dipp_scales, s.default_dipp, "sweep.default_dipp")
  _scales("sweep.distar_scales", s.distar_scales, s.default_distar, "sweep.default_distar")
  _scales("sweep.didr_betas", s.didr_betas, s.default_didr, "sweep.default_didr")
  ests = tuple(s.didr_estimators)
  if not ests or len(set(ests)) != len(ests):
    fail("sweep.didr_estimators", f"{ests}: needs distinct entries (the first is the default)")
  for e in ests:
    try:
      estimator_objective(e)
    except ValueError as err:
      fail("sweep.didr_estimators", str(err))
  for spec in run_specs(cfg):       # every objective field, through the trainer's own checks
    try:
      objective_config(cfg, spec.method, spec.estimator)
    except ValueError as err:                  # the trainer's messages start with objective.<field>
      raise ConfigError(f"config.{err}") from None
  if cfg.eval.drs_check_states < 0:
    fail("eval.drs_check_states", f"must be >= 0 (0: off), got {cfg.eval.drs_check_states}")
  if cfg.eval.drs_check_states:
    _positive_ints(cfg, ["eval.drs_check_chains", "eval.drs_check_steps"])
    if cfg.eval.drs_check_chains < 2:
      fail("eval.drs_check_chains", f"the jackknife needs >= 2 chains, got {cfg.eval.drs_check_chains}")
  if not 0 < cfg.eval.off_manifold_quantile < 1:
    fail("eval.off_manifold_quantile", f"must be in (0, 1), got {cfg.eval.off_manifold_quantile}")
  check_mesh(cfg, ("reference.batch", "distill.batch", "distill.pool_size", "align.batch"))
