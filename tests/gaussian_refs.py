"""Analytic Gaussian denoisers for objective tests (exact reference, exact TA of an affine generator)."""
import jax.numpy as jnp

from didr_jax.diffusion import Schedule

SCHED = Schedule("continuous_vp")


def gaussian_denoiser(mean, cov, sched=SCHED):
  """(x, t, cond) -> (D, eps_hat) for q0 = N(mean, cov): D = mean + a cov (a^2 cov + s^2 I)^-1 (x - a mean)."""
  mean, cov = jnp.asarray(mean), jnp.asarray(cov)
  d = mean.shape[0]

  def denoise(x, t, cond=None):
    a, s = sched.alpha_sigma(t)
    cov_t = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * jnp.eye(d)
    r = jnp.linalg.solve(cov_t, (x - a[:, None] * mean)[..., None])[..., 0]
    dd = mean + a[:, None] * (r @ cov.T)
    return dd, (x - a[:, None] * dd) / s[:, None]
  return denoise


def affine_generator(params, z):
  return z @ params["A"].T + params["c"]


def affine_ta(params):
  """Exact denoiser of the affine generator's diffused marginals, N(c, A A^T)."""
  return gaussian_denoiser(params["c"], params["A"] @ params["A"].T)
