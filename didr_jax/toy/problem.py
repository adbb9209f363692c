"""The toy's analytic side: mixture prior q0, reward, exact p* by quadrature, evaluation metrics."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.objectives import GaussianMixture, gauss_hermite_log_mgf, step_log_mgf

REWARDS = ("sigmoid", "step")


@dataclasses.dataclass(frozen=True)
class ToyProblem:
  mixture: GaussianMixture
  tau: float
  beta: float
  reward_kind: str = "sigmoid"

  @classmethod
  def from_config(cls, toy):
    means = tuple(tuple(float(v) for v in m) for m in toy.means)
    return cls(GaussianMixture(means, tuple(map(float, toy.stds)), tuple(map(float, toy.weights))),
               float(toy.tau), float(toy.beta), str(toy.reward))

  @property
  def dim(self) -> int:
    return self.mixture.dim

  @property
  def differentiable(self) -> bool:
    """The step reward's gradient is zero almost everywhere: no method may differentiate it."""
    return self.reward_kind == "sigmoid"

  def reward1d(self, x1):
    """sigmoid(x1 / tau), or the decision boundary 1[x1 > 0] itself."""
    if self.reward_kind == "step":
      return (x1 > 0).astype(jnp.float32)
    return jax.nn.sigmoid(x1 / self.tau)

  def reward(self, x):
    """r(x) = reward1d(x[..., 0])."""
    return self.reward1d(x[..., 0])

  def log_mgf(self, m, v):
    """log E_{N(m, v)} exp(r(x)/beta): the exact per-component factor of the DRS."""
    if self.reward_kind == "step":
      return step_log_mgf(self.beta)(m, v)
    return gauss_hermite_log_mgf(self.reward1d, self.beta)(m, v)

  def sample_p_star(self, key, n: int):
    """n exact samples of p* = q0 exp(r/beta)/Z by rejection from q0 (r <= 1, so exp((r-1)/beta)
    <= 1 is the acceptance probability), drawn in rounds until n are accepted."""
    out, need, i = [], n, 0
    while need > 0:
      k1, k2 = jax.random.split(jax.random.fold_in(key, i))
      x = self.sample_q0(k1, 4 * need + 64)
      acc = jax.random.uniform(k2, (x.shape[0],)) < jnp.exp((self.reward(x) - 1.0) / self.beta)
      x = np.asarray(x)[np.asarray(acc)][:need]
      out.append(x)
      need -= len(x)
      i += 1
    return jnp.asarray(np.concatenate(out))

  def sample_q0(self, key, n: int):
    mu, sd, w = self.mixture.arrays
    kc, kn = jax.random.split(key)
    comp = jax.random.choice(kc, w.shape[0], (n,), p=w)
    return mu[comp] + sd[comp][:, None] * jax.random.normal(kn, (n, self.dim))

  # ---- exact p* on the first coordinate (quadrature on a fine grid) ----
  def grid(self, n: int = 20001):
    mu = np.asarray(self.mixture.means)[:, 0]
    sd = np.asarray(self.mixture.stds)
    lo, hi = float(np.min(mu - 8 * sd)), float(np.max(mu + 8 * sd))
    return np.linspace(lo, hi, n)

  def q0_marginal(self, x1):
    """Density of the first coordinate under q0 (isotropic components factorise)."""
    mu = np.asarray(self.mixture.means)[:, 0]
    sd = np.asarray(self.mixture.stds)
    w = np.asarray(self.mixture.weights)
    x1 = np.asarray(x1, np.float64)[..., None]
    return np.sum(w * np.exp(-0.5 * ((x1 - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)), -1)

  def target_marginal(self, x1):
    """p*(x1) = q0(x1) exp(r(x1)/beta) / Z, normalised on the grid."""
    g = self.grid()
    unnorm = lambda x: self.q0_marginal(x) * np.exp(np.asarray(self.reward1d(jnp.asarray(x, jnp.float32)),
                                                               np.float64) / self.beta)
    z = np.trapezoid(unnorm(g), g)
    return unnorm(x1) / z

  def q0_log_density(self, x):
    return np.asarray(self.mixture.log_prob(jnp.asarray(x, jnp.float32)), np.float64)


def _cdf(density, g):
  c = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(g))])
  return c / c[-1]


def target_summary(problem: ToyProblem, num_is: int = 400_000, seed: int = 1234) -> dict:
  """Exact P*(x>0) and reward by quadrature; per-mode stats of p* by importance sampling from q0."""
  g = problem.grid()
  p = problem.target_marginal(g)
  pos = g > 0
  p_pos = float(np.trapezoid(p[pos], g[pos]))
  reward = float(np.trapezoid(p * np.asarray(problem.reward1d(jnp.asarray(g, jnp.float32))), g))
  x = np.asarray(problem.sample_q0(jax.random.PRNGKey(seed), num_is), np.float64)
  w = np.exp(np.asarray(problem.reward(jnp.asarray(x, jnp.float32)), np.float64) / problem.beta)
  return {"p_pos": p_pos, "reward_mean": reward,
          "mode_stats": mode_stats(problem, x, weights=w / w.sum())}


def mode_stats(problem: ToyProblem, x: np.ndarray, weights=None) -> list[dict]:
  """Mass, mean and std of the first coordinate per mode (samples go to the nearest mode mean)."""
  x = np.asarray(x, np.float64)
  w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights)
  mu = np.asarray(problem.mixture.means, np.float64)
  nearest = np.argmin(np.sum((x[:, None, :] - mu[None]) ** 2, -1), axis=1)
  out = []
  for k in range(len(mu)):
    sel = nearest == k
    mass = float(np.sum(w[sel]))
    if mass > 0:
      m = float(np.sum(w[sel] * x[sel, 0]) / mass)
      sd = float(np.sqrt(np.sum(w[sel] * (x[sel, 0] - m) ** 2) / mass))
    else:
      m, sd = float("nan"), float("nan")
    out.append({"mode": k, "center": float(mu[k, 0]), "mass": mass, "mean": m, "std": sd})
  return out


def sample_metrics(problem: ToyProblem, x: np.ndarray, num_bins: int = 100) -> dict:
  """p_pos, W1 and histogram KL to the exact p* (first coordinate), off-manifold mass, modes, reward."""
  x = np.asarray(x, np.float64)
  x1 = x[:, 0]
  g = problem.grid()
  p = problem.target_marginal(g)
  f_star = _cdf(p, g)
  f_emp = np.searchsorted(np.sort(x1), g, side="right") / len(x1)
  w1 = float(np.trapezoid(np.abs(f_emp - f_star), g)
             + np.sum(np.clip(g[0] - x1, 0, None)) / len(x1)
             + np.sum(np.clip(x1 - g[-1], 0, None)) / len(x1))
  edges = np.linspace(g[0], g[-1], num_bins + 1)
  counts, _ = np.histogram(np.clip(x1, g[0], g[-1]), edges)
  p_hat = counts / counts.sum()
  f_edges = np.interp(edges, g, f_star)
  p_bins = np.maximum(np.diff(f_edges), 1e-12)
  nz = p_hat > 0
  kl = float(np.sum(p_hat[nz] * np.log(p_hat[nz] / p_bins[nz])))
  logq = problem.q0_log_density(x)
  peak = float(np.max(problem.q0_log_density(np.asarray(problem.mixture.means, np.float64))))
  off = float(np.mean(logq < peak + np.log(1e-3)))
  reward = float(np.mean(np.asarray(problem.reward(jnp.asarray(x, jnp.float32)))))
  return {"p_pos": float(np.mean(x1 > 0)), "w1": w1, "kl_hist": kl, "off_manifold": off,
          "mode_stats": mode_stats(problem, x), "reward_mean": reward}
