"""Fail-fast validation of the toy config: one line naming the field and the reason."""
from __future__ import annotations

import math

from didr_jax.config_checks import check_mesh, fail
from didr_jax.diffusion.schedules import make_schedule
from didr_jax.errors import ConfigError  # re-exported: validate.ConfigError
from didr_jax.objectives import method_and_drs
from didr_jax.toy.experiment import objective_config

TOY_REWARDS = ("sigmoid", "step")
TOY_GENERATORS = ("mlp", "monotone")


def validate(cfg) -> None:
  toy = cfg.toy
  if not toy.means:
    fail("toy.means", "needs at least one mode")
  dims = {len(m) for m in toy.means}
  if len(dims) != 1 or dims.pop() not in (1, 2):
    fail("toy.means", f"every mode needs the same dimension, 1 or 2; got {toy.means}")
  k = len(toy.means)
  for name in ("stds", "weights"):
    if len(getattr(toy, name)) != k:
      fail(f"toy.{name}", f"has {len(getattr(toy, name))} entries for {k} modes")
  if any(s <= 0 for s in toy.stds):
    fail("toy.stds", f"must be > 0, got {toy.stds}")
  if any(w < 0 for w in toy.weights) or not math.isclose(sum(toy.weights), 1.0, abs_tol=1e-6):
    fail("toy.weights", f"must be non-negative and sum to 1, got {toy.weights} (sum {sum(toy.weights)})")
  if toy.beta <= 0:
    fail("toy.beta", f"must be > 0, got {toy.beta}")
  if toy.tau <= 0:
    fail("toy.tau", f"must be > 0, got {toy.tau}")
  if cfg.generator.kind not in TOY_GENERATORS:
    fail("generator.kind", f"unknown {cfg.generator.kind!r}; choose from {TOY_GENERATORS}")
  if cfg.generator.kind == "monotone" and len(toy.means[0]) != 1:
    fail("generator.kind", "'monotone' is a map R -> R; a 2-D toy needs 'mlp'")
  if toy.reward not in TOY_REWARDS:
    fail("toy.reward", f"unknown {toy.reward!r}; choose from {TOY_REWARDS}")
  if cfg.objective.drp_k < 1:
    fail("objective.drp_k", f"K must be >= 1, got {cfg.objective.drp_k}")
  if any(kk < 1 for kk in cfg.eval.drp_bias_ks):
    fail("eval.drp_bias_ks", f"every K must be >= 1, got {cfg.eval.drp_bias_ks}")
  if cfg.objective.cfg_w != 0:
    fail("objective.cfg_w", "the toy is unconditional: guidance must be 0")
  if not cfg.methods:
    fail("methods", "needs at least one method")
  for method in cfg.methods:
    try:
      method_and_drs(method, cfg.objective.drs)
    except ValueError as e:
      fail("methods", str(e))
  if len(set(cfg.methods)) != len(cfg.methods):
    fail("methods", f"lists a method twice: {cfg.methods}")
  rows = cfg.objective.snis_rows
  if 0 < rows < cfg.align.batch and cfg.align.batch % rows:
    fail("objective.snis_rows", f"{rows} must divide align.batch={cfg.align.batch} (or be 0)")
  for method in cfg.methods:
    try:
      obj = objective_config(cfg, method)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    if obj.needs_reward_grad and toy.reward == "step":
      fail("methods", f"{method!r} differentiates the reward, but toy.reward='step' has zero "
                       "gradient almost everywhere; use di, or didr with objective.drs snis or exact")
  try:
    sched = make_schedule(cfg.schedule)
  except ValueError as e:
    fail("schedule", str(e))
  if sched.kind == "discrete_vp":
    fail("schedule.kind", "the toy uses a continuous time grid; choose continuous_vp or rectified_flow")
  for name, (lo, hi) in (("align.ta_t_range", cfg.align.ta_t_range),
                         ("align.gen_t_range", cfg.align.gen_t_range),
                         ("eval.bias_t_range", cfg.eval.bias_t_range)):
    if not 0 < lo < hi <= 1:
      fail(name, f"needs 0 < lo < hi <= 1, got {(lo, hi)}")
  if not 0 < cfg.reference.t_min < 1:
    fail("reference.t_min", f"needs 0 < t_min < 1, got {cfg.reference.t_min}")
  for name in ("network.width", "network.depth", "generator.width", "generator.depth",
               "align.k_ta", "distill.ddim_steps", "eval.t_bins"):
    group, key = name.split(".")
    if cfg[group][key] < 1:
      fail(name, f"must be >= 1, got {cfg[group][key]}")
  if cfg.train.parallel_methods < 1:
    fail("train.parallel_methods", f"must be >= 1, got {cfg.train.parallel_methods}")
  if cfg.align.ema_decay < 0 or cfg.align.ema_decay >= 1:
    fail("align.ema_decay", f"must be in [0, 1), got {cfg.align.ema_decay}")
  chunk = cfg.train.steps_per_chunk
  for name in ("reference.steps", "distill.steps", "align.steps"):
    group, key = name.split(".")
    n = cfg[group][key]
    if n < 1 or n % chunk:
      fail(name, f"{n} must be a positive multiple of train.steps_per_chunk={chunk}")
  check_mesh(cfg, ("distill.pool_size", "reference.batch", "distill.batch", "align.batch",
                   "eval.num_samples", "eval.drp_bias_samples"))
