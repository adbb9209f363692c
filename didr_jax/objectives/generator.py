"""Generator pseudo-losses of DI, DI++, DI* and DIDR (docs/method.md section 3).

Each is a scalar whose gradient w.r.t. the generator parameters is the method's gradient.
Networks arrive as closures over their (frozen or current) parameters:
  generate(z, cond) -> x0                 the one-step generator (the only thing differentiated)
  ta(x, t, cond) -> (D, eps_hat)          the teaching assistant s_psi
  ref(x, t, cond, guided) -> (D, eps_hat) the frozen reference, guided (augmented CFG) or plain
  reward(x0, cond) -> r [B]               differentiable reward of a clean sample
  exact_drs(x, t, cond) -> DRS            optional analytic DRS (toy / tests)
Per-sample reductions: sum over non-batch dims, mean over the batch. Score differences, norms and
normalisers are float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import at_least_f32, broadcast_to, score
from didr_jax.objectives.drs import drp_estimate
from didr_jax.objectives.posterior_drs import snis_correction

METHODS = ("di", "dipp", "distar", "didr")
WEIGHTINGS = ("plain", "dmd2")
DRS_SOURCES = ("exact", "drp", "snis", "hybrid")
CFG_PLACEMENTS = ("in", "out")
SNIS_VARIANCES = ("local", "table", "none")
N_TBINS = 4                      # t-bins of the DRS-to-KL gradient ratio metric


def method_and_drs(name: str, drs: str) -> tuple[str, str]:
  """(method, DRS estimator) of a method name, the one scheme of every experiment: one of
  ``METHODS`` (DIDR with the experiment's own estimator ``drs``, i.e. ``objective.drs``), or
  ``didr-<estimator>`` for DIDR with another estimator (the toy and the digits sweep compare
  several). ValueError for anything else, including ``didr-<drs>`` (that is ``didr``)."""
  if name in METHODS:
    return name, drs
  head, _, estimator = name.partition("-")
  if head == "didr" and estimator in DRS_SOURCES:
    if estimator == drs:
      raise ValueError(f"{name!r} is 'didr' (objective.drs={drs!r}); name it 'didr'")
    return "didr", estimator
  raise ValueError(f"unknown method {name!r}; choose from {METHODS} or didr-<estimator> with an "
                   f"estimator from {DRS_SOURCES}")
RATIO_PREFIX = "ratio:"

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  method: str = "didr"
  weighting: str = "plain"        # plain: w'(t) = 1; dmd2: w' = 1 / mean|x0 - D_ref| per sample
  alpha_rew: float = 1.0          # DI++ / DI* endpoint reward scale
  beta: float = 1.0               # DIDR KL strength: p* ~ q0 exp(r / beta)
  drs: str = "snis"               # DIDR DRS estimator: exact | drp | snis | hybrid (docs/method.md 4)
  drp_k: int = 2                  # DRP DDIM steps
  drp_t_max: float = -1.0         # DRP term only for t <= t_max (< 0: no cut-off; exact DRS unaffected)
  snis_k: int = 4                 # snis: ancestral chain steps
  snis_m: int = 8                 # snis: posterior samples per row
  snis_chunk: int = 0             # snis: samples per row run at once (0: all M)
  snis_rows: int = 0              # snis: rows of a batch that get the estimate (0: all; see below)
  snis_variance: str = "local"    # snis chains' x0 variance: local | table | none
  snis_var_max: float = 0.0       # snis: bound on that variance per dimension (0: none; see below)
  hybrid_snr: float = 0.66        # hybrid: K=1 DRP where a^2/s^2 >= this, snis below
  distar_c: float = 1.0           # Pseudo-Huber constant
  cfg_placement: str = "in"       # DI*: guided reference inside y ("in") or as implicit reward ("out")
  cfg_w: float = 0.0              # augmented guidance scale of the reference (0: no guidance)

  def __post_init__(self):
    for name, value, allowed in (("method", self.method, METHODS),
                                 ("weighting", self.weighting, WEIGHTINGS),
                                 ("drs", self.drs, DRS_SOURCES),
                                 ("cfg_placement", self.cfg_placement, CFG_PLACEMENTS),
                                 ("snis_variance", self.snis_variance, SNIS_VARIANCES)):
      if value not in allowed:
        raise ValueError(f"objective.{name}: {value!r} unknown; choose one of {allowed}")
    if self.method == "distar" and self.weighting != "plain":
      raise ValueError(f"objective.weighting: {self.weighting!r} normalises the KL gradient of "
                       f"di, dipp and didr; distar weights its divergence term and its CFG term "
                       f"by its own w(t) = s_t^2/a_t: set objective.weighting='plain'")
    if self.beta <= 0:
      raise ValueError(f"objective.beta: must be > 0, got {self.beta}")
    if self.drp_k < 1:
      raise ValueError(f"objective.drp_k: must be >= 1, got {self.drp_k}")
    if self.distar_c <= 0:
      raise ValueError(f"objective.distar_c: must be > 0, got {self.distar_c}")
    if self.snis_k < 1:
      raise ValueError(f"objective.snis_k: must be >= 1, got {self.snis_k}")
    if self.snis_m < 2:
      raise ValueError(f"objective.snis_m: must be >= 2 (the jackknife needs two samples), "
                       f"got {self.snis_m}")
    if self.snis_chunk < 0 or (self.snis_chunk and self.snis_m % self.snis_chunk):
      raise ValueError(f"objective.snis_chunk: {self.snis_chunk} must be 0 or divide "
                       f"objective.snis_m={self.snis_m}")
    if self.snis_rows < 0:
      raise ValueError(f"objective.snis_rows: must be >= 0 (0: every row), got {self.snis_rows}")
    if self.snis_var_max < 0:
      raise ValueError(f"objective.snis_var_max: must be >= 0 (0: no bound), got {self.snis_var_max}")
    if self.hybrid_snr <= 0:
      raise ValueError(f"objective.hybrid_snr: must be > 0, got {self.hybrid_snr}")

  @classmethod
  def from_group(cls, group, **overrides) -> "ObjectiveConfig":
    """The objective of a config's ``objective`` group (a mapping; every experiment builds it
    here) with ``overrides``; ValueError naming ``objective.<key>`` for a key it does not have."""
    values = group.to_dict() if hasattr(group, "to_dict") else dict(group)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in known:
        raise ValueError(f"objective.{key}: unknown; the objective has {sorted(known)}")
    return cls(**dict(values, **overrides))

  @property
  def stochastic_drs(self) -> bool:
    """Whether the generator loss draws posterior samples (needs per-row keys and a table)."""
    return self.method == "didr" and self.drs in ("snis", "hybrid")

  @property
  def needs_drs_table(self) -> bool:
    return self.stochastic_drs and self.snis_variance == "table"

  @property
  def needs_reward_grad(self) -> bool:
    """Whether the method differentiates the reward (a step reward cannot serve it)."""
    return self.method in ("dipp", "distar") or (self.method == "didr" and self.drs in ("drp", "hybrid"))


def _per_sample_sum(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _batch_dot(g, x):
  """mean_b sum_i g_bi x_bi with g under stop-gradient: the pseudo-loss whose grad is g dx/dtheta."""
  return jnp.mean(_per_sample_sum(sg(g) * x))


def kl_weight(cfg: ObjectiveConfig, x0, d_ref):
  """w'(t) per sample: 1 (plain) or the DMD2 normaliser 1 / mean|x0 - D_ref| (no gradient)."""
  if cfg.weighting == "plain":
    return jnp.ones((x0.shape[0],), jnp.float32)
  norm = jnp.mean(jnp.abs(sg(x0) - sg(d_ref)).reshape(x0.shape[0], -1), axis=-1)
  return jnp.nan_to_num(1.0 / norm, nan=0.0, posinf=0.0, neginf=0.0)


def diffused_reward_shift(cfg: ObjectiveConfig, **kwargs):
  """(T, metrics) of :func:`shift_and_d_ref`."""
  shift, metrics, _ = shift_and_d_ref(cfg, **kwargs)
  return shift, metrics


def shift_and_d_ref(cfg: ObjectiveConfig, *, ref, reward, schedule, x_t, t, cond, keys=None,
                    drs_table=None, exact_drs=None, d_ref=None):
  """(T, metrics, D_ref): the D-space DRS correction T = (s^2/a) DRS that moves D_ref toward D*_t,
  and the guided D_ref(x_t): ``d_ref`` when given, else the DRP's first reference call (drp,
  hybrid), else None.

  ``x_t`` is under stop-gradient; ``keys`` [B, 2] per-row keys for the stochastic estimators,
  ``drs_table`` their variance table (docs/method.md 4); ``d_ref`` the guided D_ref(x_t) when
  the caller has it (the posterior chains start from it). With ``snis_rows`` = n < B, every
  (B/n)-th row gets the posterior-sample estimate times B/n and the others none: the batch mean
  of the DRS term stays unbiased at n/B of the cost (rows are strided, so each device's shard of
  a batch-sharded x_t contributes equally).
  """
  a, s = schedule.alpha_sigma(t)
  to_d = broadcast_to(s ** 2 / a, x_t)
  guided = lambda x, tt, c: ref(x, tt, c, True)
  metrics = {}
  if cfg.drs in ("drp", "hybrid"):
    drs, r_phi, d_first = drp_estimate(guided, reward, schedule, x_t, t, cond,
                                       cfg.drp_k if cfg.drs == "drp" else 1, cfg.beta)
    d_ref = d_first if d_ref is None else d_ref
    t_drp = to_d * at_least_f32(drs)
    if cfg.drs == "drp" and cfg.drp_t_max >= 0:
      t_drp = t_drp * broadcast_to((t <= cfg.drp_t_max).astype(t_drp.dtype), t_drp)
    metrics["drp_reward"] = jnp.mean(r_phi)
    if cfg.drs == "drp":
      return t_drp, metrics, d_ref
  if cfg.drs == "exact":
    if exact_drs is None:
      raise ValueError("objective.drs='exact' needs an analytic prior (the task gives no exact_drs)")
    return to_d * at_least_f32(exact_drs(x_t, t, cond)), metrics, d_ref
  if keys is None:
    raise ValueError(f"objective.drs={cfg.drs!r} draws posterior samples: pass per-row keys")
  if cfg.snis_variance == "table" and drs_table is None:
    raise ValueError(f"objective.drs={cfg.drs!r} with snis_variance='table' needs the variance table")
  b = t.shape[0]
  stride = b // cfg.snis_rows if 0 < cfg.snis_rows < b else 1
  if b % stride:
    raise ValueError(f"objective.snis_rows={cfg.snis_rows} must divide the batch of {b} rows")
  pick = lambda v: v[::stride]
  t_sub, snis_metrics = snis_correction(guided, reward, schedule, pick(x_t), pick(t),
                                        jax.tree.map(pick, cond), pick(keys), k=cfg.snis_k,
                                        m=cfg.snis_m, beta=cfg.beta, table=drs_table,
                                        variance=cfg.snis_variance, chunk=cfg.snis_chunk,
                                        d_ref=None if d_ref is None else pick(d_ref),
                                        var_max=cfg.snis_var_max)
  # Every stride-th row carries the estimate, weighted by the stride: unbiased for the batch mean.
  t_snis = jnp.zeros_like(at_least_f32(x_t)).at[::stride].set(stride * t_sub)
  used = jnp.zeros_like(t, jnp.float32).at[::stride].set(1.0)
  if cfg.drs == "hybrid":
    high_snr = (a / s) ** 2 >= cfg.hybrid_snr
    t_snis = jnp.where(broadcast_to(high_snr, t_snis), t_drp, t_snis)
    used = 1.0 - high_snr.astype(jnp.float32)
  ess = jnp.zeros_like(used).at[::stride].set(snis_metrics["ess"])
  metrics["snis_ess"] = jnp.sum(used * ess) / jnp.maximum(jnp.sum(used), 1.0)
  metrics.update(tbin_ratios("snis_ess", schedule, t, used * ess, used))
  return t_snis, metrics, d_ref


def generator_loss(cfg: ObjectiveConfig, *, generate, ta, ref, reward, schedule, z, cond, t, eps,
                   exact_drs=None, keys=None, drs_table=None, reward_metrics=True):
  """(pseudo-loss, metrics) of ``cfg.method`` for one batch; see the module docstring.

  ``reward_metrics`` (a bool or a traced bool scalar): whether this step reports the batch's
  reward. DI and DIDR need r(x0) for nothing else, so when it is False the decode and the reward
  model do not run (``lax.cond``); DI++ and DI* differentiate r(x0) and always report it.
  """
  x0 = at_least_f32(generate(z, cond))
  a, s = schedule.alpha_sigma(t)
  ab, sb = broadcast_to(a, x0), broadcast_to(s, x0)
  x_t = ab * x0 + sb * eps
  if cfg.method == "distar":
    return _distar_loss(cfg, x0, x_t, t, a, s, eps, ta=ta, ref=ref, reward=reward, cond=cond)

  d_ta, _ = ta(sg(x_t), t, cond)
  metrics = {}
  # The DRP's first reference call is D_ref(x_t): DIDR with drp / hybrid does not run it again.
  drp_gives_d_ref = cfg.method == "didr" and cfg.drs in ("drp", "hybrid")
  d_ref = None if drp_gives_d_ref else ref(sg(x_t), t, cond, True)[0]
  if cfg.method == "didr":
    shift_d, drs_metrics, d_ref = shift_and_d_ref(cfg, ref=ref, reward=reward, schedule=schedule,
                                                  x_t=sg(x_t), t=t, cond=cond, keys=keys,
                                                  drs_table=drs_table, exact_drs=exact_drs,
                                                  d_ref=d_ref)
    metrics.update(drs_metrics)
  w = kl_weight(cfg, x0, d_ref)
  g = broadcast_to(w, x0) * (d_ta - d_ref)
  kl_norm = jnp.sqrt(_per_sample_sum(g ** 2))
  metrics["kl_grad_norm"] = jnp.mean(kl_norm)
  if cfg.method == "didr":
    # T = (s^2/a) DRS moves D_ref toward D*_t; with w' it keeps lambda_r = w' s^2/a^2
    # (docs/method.md 3.4).
    shift = broadcast_to(w, x0) * shift_d
    g = g - shift
    shift_norm = jnp.sqrt(_per_sample_sum(shift ** 2))
    metrics["drs_grad_norm"] = jnp.mean(shift_norm)
    metrics.update(tbin_ratios("drs_to_kl", schedule, t, shift_norm, kl_norm))
  loss = _batch_dot(g, x0)
  if cfg.method == "dipp":
    r0 = reward(x0, cond)
    loss = loss - cfg.alpha_rew * jnp.mean(r0)
    metrics.update(_reward_metrics(r0))
  elif isinstance(reward_metrics, bool):
    metrics.update(_reward_metrics(reward(sg(x0), cond) if reward_metrics else None))
  else:
    metrics.update(jax.lax.cond(reward_metrics, lambda: _reward_metrics(reward(sg(x0), cond)),
                                lambda: _reward_metrics(None)))
  metrics["gen_loss"] = loss
  return loss, metrics


def _reward_metrics(r0):
  """The batch's reward sums as "ratio:" pairs, (sum r, n) and (sum r^2, n), or (0, 0) without a
  reward (``r0`` None): sums, so microbatches, shards and a chunk's reporting steps add up exactly;
  the host reduction turns them into ``reward`` and ``reward_std``."""
  if r0 is None:
    zero = jnp.zeros((2,), jnp.float32)
    return {f"{RATIO_PREFIX}reward": zero, f"{RATIO_PREFIX}reward_sq": zero}
  r0 = sg(r0).astype(jnp.float32).reshape(-1)
  n = jnp.asarray(r0.shape[0], jnp.float32)
  return {f"{RATIO_PREFIX}reward": jnp.stack([jnp.sum(r0), n]),
          f"{RATIO_PREFIX}reward_sq": jnp.stack([jnp.sum(jnp.square(r0)), n])}


def tbin_ratios(name: str, schedule, t, num, den) -> dict:
  """Per-t-bin (sum num, sum den) pairs under "ratio:<name>/t<lo>-<hi>" keys; the host reduction
  (training.metrics.reduce_chunk_metrics) divides the sums over a chunk, so empty bins drop out."""
  lo, hi = schedule.t_range
  discrete = schedule.kind == "discrete_vp"
  top = hi + 1.0 if discrete else hi
  edges = np.linspace(lo, top, N_TBINS + 1)
  idx = jnp.clip(jnp.floor((t - lo) / (top - lo) * N_TBINS), 0, N_TBINS - 1).astype(jnp.int32)
  out = {}
  for i in range(N_TBINS):
    m = (idx == i).astype(jnp.float32)
    label = (f"t{int(edges[i]):03d}-{int(edges[i + 1]):03d}" if discrete
             else f"t{edges[i]:.2f}-{edges[i + 1]:.2f}")
    out[f"{RATIO_PREFIX}{name}/{label}"] = jnp.stack([jnp.sum(m * sg(num)), jnp.sum(m * sg(den))])
  return out


def _distar_loss(cfg, x0, x_t, t, a, s, eps, *, ta, ref, reward, cond):
  """DI*: -alpha r(x0) - w(t) d'(y)^T (s_psi(x_t) + eps / s_t), y = s_psi - s~_ref.

  Gradients flow through x_t into both factors and through the frozen networks' inputs.
  [choice] w(t) = s_t^2 / a_t, which makes the term O(|D_psi - x0|) across noise levels. The
  "out" CFG term carries the same w(t): w (s_guided - s_cond) = D_guided - D_cond, the D-space
  difference it uses. ``weighting`` (the KL normaliser of the other methods) must be "plain".
  """
  xb = x_t
  sb = broadcast_to(s, xb)
  d_ta, _ = ta(xb, t, cond)
  s_ta = score(d_ta, xb, a, s)
  d_in, _ = ref(xb, t, cond, cfg.cfg_placement == "in")
  s_ref = score(d_in, xb, a, s)
  y = at_least_f32(s_ta - s_ref)
  norm = jnp.sqrt(_per_sample_sum(y ** 2) + cfg.distar_c ** 2)
  d_prime = y / broadcast_to(norm, y)
  weight = s ** 2 / a
  div = _per_sample_sum(d_prime * (s_ta + eps / sb))
  r0 = reward(x0, cond)
  loss = -cfg.alpha_rew * jnp.mean(r0) - jnp.mean(weight * div)
  metrics = {"pseudo_huber": jnp.mean(sg(norm - cfg.distar_c))}
  if cfg.cfg_placement == "out" and cfg.cfg_w != 0.0:
    d_c, _ = ref(sg(x_t), t, cond, False)
    d_g, _ = ref(sg(x_t), t, cond, True)
    # guided - plain = w (D_c - D_u): the implicit CFG reward as a DI++-style IKL term.
    loss = loss - _batch_dot(d_g - d_c, x0)
  metrics.update(_reward_metrics(r0))
  metrics["gen_loss"] = loss
  return loss, metrics
