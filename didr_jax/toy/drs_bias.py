"""Exact-reference analysis of the DRS estimators on a Gaussian-mixture toy (docs/method.md 4.5).

With the closed-form mixture posterior as the reference there is no network error: what remains is
the estimator's own bias. Two measurements:

* :func:`bias_per_bin`: E[T_est] / E[T_exact] per t-bin, with x_t drawn from q_t (x0 ~ q0) or from
  p*_t (x0 ~ p*), T = (s^2/a) DRS the D-space correction the generator loss uses; the integrated
  bias under the loss's own t-weighting; the per-estimate relative standard deviation.
* :func:`fixed_point`: the stationary generator distribution of DIDR with an exact reference, an
  exact TA and a fully flexible generator, driven by the estimator's mean: particles x0 follow
  -E_{t,eps}[D_p(x_t) - D_ref(x_t) - E T_est(x_t)] (the toy's plain weighting) until they stop.
  The estimator's mean is tabulated on a (t, x_t) grid (1-D priors only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.objectives import ObjectiveConfig, diffused_reward_shift, mixture_drs, variance_table


def exact_reference(problem, schedule):
  """(x, t, cond) -> (D, eps_hat) of the exact reference: the mixture's posterior mean."""
  def denoise(x, t, cond=None, guided=False):
    a, s = schedule.alpha_sigma(t)
    d = problem.mixture.denoise(x, a, s)
    return d, (x - a[:, None] * d) / s[:, None]
  return denoise


def exact_shift(problem, schedule, x_t, t):
  """T = (s^2/a) DRS(x_t, t) by the closed-form mixture posterior."""
  a, s = schedule.alpha_sigma(t)
  return (s ** 2 / a)[:, None] * mixture_drs(problem.mixture, problem.log_mgf, x_t, a, s)


def exact_table(problem, schedule, key, n: int = 16384, num_t: int = 64):
  """The estimators' variance table computed from the exact reference and q0 samples."""
  ref = exact_reference(problem, schedule)
  x0 = problem.sample_q0(key, n)
  return variance_table(ref, schedule, x0, None, jax.random.fold_in(key, 1),
                        jnp.linspace(1e-3, schedule.t_range[1], num_t))


def estimator(obj: ObjectiveConfig, problem, schedule, table, ref=None):
  """jitted (x_t, t, keys) -> T_est through the generator loss's own code path; the reference is
  the exact one unless ``ref`` (x, t, cond, guided) -> (D, eps_hat) is given."""
  ref = exact_reference(problem, schedule) if ref is None else ref
  reward = lambda x0, c: problem.reward(x0)
  return jax.jit(lambda x, t, keys: diffused_reward_shift(
      obj, ref=ref, reward=reward, schedule=schedule, x_t=x, t=t, cond=None, keys=keys,
      drs_table=table)[0])


def bias_per_bin(obj, problem, schedule, table, key, *, t_range, bins: int = 10,
                 per_bin: int = 1024, repeats: int = 4, weighting: str = "q", ref=None) -> dict:
  """Per t-bin ratio E[T_est]/E[T_exact] (first coordinate), the integrated relative bias
  sum(E T_est - E T_exact) / sum(E T_exact) over t ~ U(t_range) (the toy's plain weighting), and
  the relative std sqrt(E Var[T_est | x_t]) / sqrt(E T_exact^2) per bin and pooled over all t."""
  kx, kt, ke, kr = jax.random.split(key, 4)
  n = bins * per_bin
  x0 = problem.sample_q0(kx, n) if weighting == "q" else problem.sample_p_star(kx, n)
  edges = np.linspace(*t_range, bins + 1)
  u = jax.random.uniform(kt, (bins, per_bin))
  t = (jnp.asarray(edges[:-1])[:, None] + u * (edges[1] - edges[0])).reshape(-1)
  a, s = schedule.alpha_sigma(t)
  x_t = a[:, None] * x0 + s[:, None] * jax.random.normal(ke, x0.shape)
  exact = np.asarray(exact_shift(problem, schedule, x_t, t))[:, 0].reshape(bins, per_bin)
  f = estimator(obj, problem, schedule, table, ref)
  est = np.stack([np.asarray(f(x_t, t, jax.random.split(jax.random.fold_in(kr, r), n)))[:, 0]
                  for r in range(repeats)]).reshape(repeats, bins, per_bin)
  mean_est, mean_exact = est.mean((0, 2)), exact.mean(1)
  var = est.var(0, ddof=1) if repeats > 1 else np.zeros_like(exact)
  rel_std = np.sqrt(var.mean(1)) / np.sqrt((exact ** 2).mean(1))
  return {"t_edges": edges.tolist(), "ratio": (mean_est / mean_exact).tolist(),
          "integrated_bias": float((mean_est.sum() - mean_exact.sum()) / mean_exact.sum()),
          "rel_std": rel_std.tolist(),
          "rel_std_pooled": float(np.sqrt(var.mean()) / np.sqrt((exact ** 2).mean())),
          "exact_mean": mean_exact.tolist()}


def mean_shift_grid(obj, problem, schedule, table, key, t_nodes, x_grid, repeats: int = 32):
  """E[T_est](t_i, x_j) on a grid [len(t_nodes), len(x_grid)] by averaging ``repeats`` draws
  (exact T for obj.drs == "exact"). Every grid point of a draw uses the same key (common random
  numbers): the averaged table is then smooth in x, where independent draws would leave a rough
  field whose spurious zeros trap particles."""
  tt = jnp.repeat(jnp.asarray(t_nodes, jnp.float32), len(x_grid))
  xx = jnp.tile(jnp.asarray(x_grid, jnp.float32), len(t_nodes))[:, None]
  if obj.drs == "exact":
    return np.asarray(exact_shift(problem, schedule, xx, tt))[:, 0].reshape(len(t_nodes), -1)
  f = estimator(obj, problem, schedule, table)
  acc = np.zeros(tt.shape[0])
  for r in range(repeats):
    keys = jnp.broadcast_to(jax.random.fold_in(key, r), (tt.shape[0], 2))
    acc += np.asarray(f(xx, tt, keys))[:, 0]
  return (acc / repeats).reshape(len(t_nodes), -1)


def fixed_point(obj, problem, schedule, table, key, *, t_range, particles: int = 400,
                iterations: int = 3000, lr: float = 1.0, num_t: int = 24, num_eps: int = 16,
                x_lim: float = 16.0, num_x: int = 641, repeats: int = 32) -> np.ndarray:
  """Particles of DIDR's stationary generator distribution (1-D priors), started from q0."""
  if problem.dim != 1:
    raise ValueError("fixed_point tabulates the estimator on a 1-D grid; the prior is "
                     f"{problem.dim}-D")
  gl_x, gl_w = np.polynomial.legendre.leggauss(num_t)
  lo, hi = t_range
  t_nodes = lo + (gl_x + 1) * (hi - lo) / 2
  t_w = jnp.asarray(gl_w / gl_w.sum(), jnp.float32)
  gh_x, gh_w = np.polynomial.hermite_e.hermegauss(num_eps)
  e_nodes, e_w = jnp.asarray(gh_x, jnp.float32), jnp.asarray(gh_w / gh_w.sum(), jnp.float32)
  x_grid = np.linspace(-x_lim, x_lim, num_x)
  shift = jnp.asarray(mean_shift_grid(obj, problem, schedule, table, key, t_nodes, x_grid, repeats),
                      jnp.float32)
  a, s = schedule.alpha_sigma(jnp.asarray(t_nodes, jnp.float32))
  xg = jnp.asarray(x_grid, jnp.float32)
  d_ref = jax.vmap(lambda ai, si: problem.mixture.denoise(xg[:, None], ai, si)[:, 0])(a, s)
  fixed = d_ref + shift                                                   # D*_t on the grid

  def force(x0):
    # D_p of the particle measure on the grid, per t node: [T, X].
    logits = -0.5 * ((xg[None, :, None] - a[:, None, None] * x0[None, None, :])
                     / s[:, None, None]) ** 2
    d_p = jnp.sum(jax.nn.softmax(logits, axis=-1) * x0[None, None, :], axis=-1)
    resid = d_p - fixed
    x_t = a[:, None, None] * x0[None, :, None] + s[:, None, None] * e_nodes[None, None, :]
    vals = jax.vmap(lambda xt, r: jnp.interp(xt, xg, r))(x_t, resid)     # [T, N, E]
    return jnp.einsum("tne,t,e->n", vals, t_w, e_w)

  @jax.jit
  def run(x0):
    return jax.lax.fori_loop(0, iterations, lambda i, x: x - lr * force(x), x0)

  q = (np.arange(particles) + 0.5) / particles
  grid = problem.grid()
  cdf = np.cumsum(problem.q0_marginal(grid))
  x0 = np.interp(q, cdf / cdf[-1], grid)
  return np.sort(np.asarray(run(jnp.asarray(x0, jnp.float32))))


def particle_summary(problem, x: np.ndarray) -> dict:
  """P(x > 0) and W1 to p* of equally weighted particles (1-D)."""
  g = problem.grid()
  p = problem.target_marginal(g)
  cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(g))])
  cdf /= cdf[-1]
  q = (np.arange(len(x)) + 0.5) / len(x)
  w1 = float(np.mean(np.abs(np.sort(x) - np.interp(q, cdf, g))))
  return {"p_pos": float(np.mean(x > 0)), "w1": w1, "max": float(np.max(x))}
