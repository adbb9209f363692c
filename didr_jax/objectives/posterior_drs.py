"""Posterior-sample estimators of the Diffused Reward Score (docs/method.md section 4).

Since grad_{x_t} log q(x0 | x_t) = (a/s^2)(x0 - E[x0 | x_t]), the DRS is a difference of two
posterior means of the reference:

    T(x_t) = (s^2/a) DRS(x_t) = E_w[x0 | x_t] - E[x0 | x_t],   w = exp(r(x0)/beta)

``snis`` estimates it from M samples of stochastic (ancestral) K-step chains of the frozen
reference started at x_t, with self-normalised reward weights and a jackknife over the samples.
It needs reward values only (no reward gradient, no Jacobian of the sampler) and divides by
nothing that vanishes at high noise. Chains take the DDPM posterior step with the x0 uncertainty
of the denoiser added to its noise (as Analytic-DPM does): per row from Tweedie's covariance
(``local``, a JVP) or from a per-t table of the average posterior variance (``table``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.diffusion import at_least_f32, broadcast_to
from didr_jax.objectives.drs import step_grid

sg = jax.lax.stop_gradient


def variance_table(ref_denoise, schedule, x0, cond, key, t_grid):
  """{"t": t_grid, "v": v}: v(t) = E ||x0 - D(x_t)||^2 / d, the average per-dimension posterior
  variance of x0 (for the exact denoiser; a learned one adds its own error).

  Analytic-DPM writes the same quantity as (s^2/a^2)(1 - E||eps_hat||^2 / d), but that form
  multiplies Monte-Carlo error by s^2/a^2 (x37 at the toy's t = 0.6); the denoising error is a mean
  of small non-negative terms. ``x0`` [N, ...] are samples of what the reference models (the toy's
  q0, or an image run's initial generator); v is clipped to Var(x0), an average posterior
  variance's bound.
  """
  x0 = at_least_f32(sg(x0))
  n = x0.shape[0]
  prior_var = jnp.mean(jnp.var(x0, axis=0))
  t_grid = jnp.asarray(t_grid, jnp.float32)

  def one(args):
    t, k = args
    tt = jnp.full((n,), t)
    a, s = schedule.alpha_sigma(tt)
    x_t = broadcast_to(a, x0) * x0 + broadcast_to(s, x0) * jax.random.normal(k, x0.shape)
    d, _ = ref_denoise(x_t, tt, cond)
    return jnp.mean((at_least_f32(d) - x0) ** 2)

  keys = jax.random.split(key, t_grid.shape[0])
  v = jax.lax.map(one, (t_grid, keys))
  return {"t": t_grid, "v": jnp.clip(sg(v), 0.0, prior_var)}


def table_variance(table, t):
  """v(t) by linear interpolation in the table (0 when there is no table: plain DDPM chains)."""
  if table is None:
    return jnp.zeros_like(at_least_f32(t))
  return jnp.interp(at_least_f32(t), table["t"], table["v"])


def _clip_variance(v, var_max):
  """A posterior variance cannot exceed the prior's: v <= var_max (0: no bound)."""
  return jnp.minimum(v, var_max) if var_max > 0 else v


def _denoise_with_variance(ref_denoise, schedule, x, t, cond, probe_keys, variance, table, var_max=0.0):
  """(D, v): the denoiser and the per-dimension x0 variance the step adds.

  table: v(t) from the run's table; local: Tweedie's Var(x0 | x_t) = (s^2/a) dD/dx_t, its
  trace / d estimated per row with one Rademacher probe (a JVP; exact in 1-D); none: 0. A learned
  eps-network's D has its error amplified by s/a at high noise, and the local estimate with it
  (s^2/a), so v is bounded by ``var_max`` (the data's per-dimension variance bound).
  """
  if variance != "local":
    d, _ = ref_denoise(x, t, cond)
    return d, _clip_variance(table_variance(table if variance == "table" else None, t), var_max)
  z = jax.vmap(lambda kb: jax.random.rademacher(kb, x.shape[1:], x.dtype))(probe_keys)
  d, jz = jax.jvp(lambda y: ref_denoise(y, t, cond)[0], (x,), (z,))
  a, s = schedule.alpha_sigma(t)
  quad = jnp.sum((at_least_f32(z) * at_least_f32(jz)).reshape(x.shape[0], -1), -1) / x[0].size
  return d, _clip_variance(jnp.maximum(s ** 2 / a * quad, 0.0), var_max)


def _step_moments(schedule, x, d, v, tj, t_next, last):
  """Mean and variance of x_{t'} ~ q(x_{t'} | x_t, x0 = D) with the x0 variance v added:
  the DDPM posterior step, or x0 ~ N(D, v) when ``last`` (t' = 0)."""
  d, x32 = at_least_f32(d), at_least_f32(x)
  a, s = schedule.alpha_sigma(tj)
  a_n, s_n = schedule.alpha_sigma(t_next)
  a_n, s_n = jnp.where(last, 1.0, a_n), jnp.where(last, 0.0, s_n)
  a_ts = a / a_n
  s2 = jnp.maximum(s ** 2, 1e-12)
  s_ts2 = jnp.maximum(s ** 2 - a_ts ** 2 * s_n ** 2, 0.0)
  c_x0, c_x = a_n * s_ts2 / s2, a_ts * s_n ** 2 / s2
  var = s_ts2 * s_n ** 2 / s2 + c_x0 ** 2 * v
  b = lambda c: broadcast_to(c, x32)
  return b(c_x0) * d + b(c_x) * x32, b(jnp.sqrt(var))


def _row_noise(keys, j, shape):
  """Standard normal noise of each row at chain step j, from that row's own key."""
  return jax.vmap(lambda kb: jax.random.normal(jax.random.fold_in(kb, j), shape))(keys)


_PROBE = 1 << 20   # probe streams fold in j + _PROBE, apart from the noise streams j


def _probe_keys(keys, j):
  return jax.vmap(lambda kb: jax.random.fold_in(kb, j + _PROBE))(keys)


def chain_start(ref_denoise, schedule, x_t, t, cond, keys, k: int, table=None,
                variance: str = "table", d=None, var_max: float = 0.0):
  """The first step of every chain from x_t: (mean, std) of x_{t_{K-1}} (x0 when K = 1).

  It is deterministic given x_t, so M chains share it (one network call per row, not M); ``d``
  reuses the caller's D(x_t) when the variance needs no JVP.
  """
  if d is None or variance == "local":
    d, v = _denoise_with_variance(ref_denoise, schedule, x_t, t, cond, _probe_keys(keys, k),
                                  variance, table, var_max)
  else:
    v = _clip_variance(table_variance(table if variance == "table" else None, t), var_max)
  return _step_moments(schedule, x_t, d, v, t, step_grid(schedule, t, k - 1, k), k == 1)


def chain_finish(ref_denoise, schedule, start, t, cond, keys, k: int, table=None,
                 variance: str = "table", var_max: float = 0.0):
  """Posterior samples x0 from the shared first step: draw x_{t_{K-1}}, then K-1 more steps.

  ``start`` = (mean, std) from :func:`chain_start`, repeated to the sample rows; ``keys`` [R, 2]
  per-sample raw keys: the noise of a sample at step j comes from fold_in(its key, j), so a sample
  does not depend on how samples are batched.
  """
  mean, std = start
  x = mean + std * _row_noise(keys, k, mean.shape[1:])

  def body(x, j):
    tj = step_grid(schedule, t, j, k)
    d, v = _denoise_with_variance(ref_denoise, schedule, x, tj, cond, _probe_keys(keys, j),
                                  variance, table, var_max)
    m, sd = _step_moments(schedule, x, d, v, tj, step_grid(schedule, t, j - 1, k), j == 1)
    return (m + sd * _row_noise(keys, j, x.shape[1:])).astype(x.dtype), None

  x0, _ = jax.lax.scan(body, x, jnp.arange(k - 1, 0, -1))
  return x0


def ancestral_chain(ref_denoise, schedule, x_t, t, cond, keys, k: int, table=None,
                    variance: str = "table", var_max: float = 0.0):
  """One posterior sample x0 ~ q(x0 | x_t) per row: K stochastic steps t_K = t > ... > t_1 > 0.

  Each step draws x_{t'} from the DDPM posterior q(x_{t'} | x_t, x0 = D(x_t)) with the variance
  raised by (a' s_{t|t'}^2 / s_t^2)^2 v (the denoiser's x0 uncertainty, see
  :func:`_denoise_with_variance`); the last step draws x0 ~ N(D(x_{t_1}), v).
  """
  x_t = sg(x_t)
  start = chain_start(ref_denoise, schedule, x_t, t, cond, keys, k, table, variance, var_max=var_max)
  return chain_finish(ref_denoise, schedule, start, t, cond, keys, k, table, variance, var_max)


def jackknife_snis_coefficients(log_w):
  """c [B, M] with T = sum_m c_m x0_m: jackknifed self-normalised minus plain posterior mean.

  T_M = sum_m softmax(log_w)_m x_m - mean_m x_m has an O(1/M) self-normalisation bias; the
  jackknife M T_M - (M-1) mean_i T_(-i) removes it. Since every T is linear in the samples, so is
  the jackknife: c = M w - (M-1) mean_i W_(-i) - 1/M, with W_(-i) the softmax without sample i.
  The coefficients sum to zero.
  """
  m = log_w.shape[-1]
  w = jax.nn.softmax(log_w, axis=-1)
  eye = jnp.eye(m, dtype=bool)
  loo = jax.nn.softmax(jnp.where(eye, -jnp.inf, log_w[..., None, :]), axis=-1)   # [B, i, m]
  return m * w - (m - 1) * jnp.mean(loo, axis=-2) - 1.0 / m, w


def snis_correction(ref_denoise, reward, schedule, x_t, t, cond, keys, *, k: int, m: int,
                    beta: float, table=None, variance: str = "table", chunk: int = 0, d_ref=None,
                    var_max: float = 0.0):
  """(T, metrics): the jackknifed self-normalised estimate of E_w[x0|x_t] - E[x0|x_t] per row.

  ``reward(x0, cond) -> [B]`` is evaluated, never differentiated. ``keys`` [B, 2] per-row raw keys.
  The M chains of a row run as rows of one batch, ``chunk`` samples per row at a time
  (0: all M at once) in a ``lax.map``; rows are repeated in place (row b's samples stay next to
  row b), so a batch-sharded x_t needs no data movement. The first chain step is shared by the
  M samples of a row (``d_ref``: the caller's D(x_t), reused when possible), so a row costs
  1 + (K-1) M reference calls. Metrics: the effective sample size 1 / sum w^2 of the normalised
  weights, per row.
  """
  if m < 2:
    raise ValueError(f"objective.snis_m must be >= 2 (the jackknife needs two samples), got {m}")
  chunk = m if chunk <= 0 else chunk
  if m % chunk:
    raise ValueError(f"objective.snis_chunk={chunk} must divide objective.snis_m={m}")
  x_t, b = sg(x_t), x_t.shape[0]
  start = chain_start(ref_denoise, schedule, x_t, t, cond, keys, k, table, variance, d=d_ref,
                      var_max=var_max)
  rep = lambda a: jnp.repeat(a, chunk, axis=0)
  cond_rep, start_rep, t_rep = jax.tree.map(rep, cond), jax.tree.map(rep, start), rep(t)

  def run_chunk(ci):
    ids = ci * chunk + jnp.arange(chunk)
    sample_keys = jax.vmap(lambda kb: jax.vmap(lambda i: jax.random.fold_in(kb, i))(ids))(keys)
    x0 = chain_finish(ref_denoise, schedule, start_rep, t_rep, cond_rep,
                      sample_keys.reshape((b * chunk,) + keys.shape[1:]), k, table, variance, var_max)
    r = at_least_f32(sg(reward(x0, cond_rep)))
    return x0.reshape((b, chunk) + x_t.shape[1:]), r.reshape(b, chunk)

  x0s, rs = jax.lax.map(run_chunk, jnp.arange(m // chunk))          # [m/chunk, B, chunk, ...]
  x0s = jnp.moveaxis(x0s, 0, 1).reshape((b, m) + x_t.shape[1:])
  rs = jnp.moveaxis(rs, 0, 1).reshape(b, m)
  coef, w = jackknife_snis_coefficients(rs / beta)
  x0s = at_least_f32(x0s)
  centred = x0s - jnp.mean(x0s, axis=1, keepdims=True)
  t_hat = jnp.sum(coef.reshape(coef.shape + (1,) * (x_t.ndim - 1)) * centred, axis=1)
  return t_hat, {"ess": 1.0 / jnp.sum(w ** 2, axis=-1), "reward": jnp.mean(rs, axis=-1)}
