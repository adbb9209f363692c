"""Posterior-sample DRS estimators against closed forms (Gaussian prior) and hand computations."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.objectives import ObjectiveConfig, generator_loss
from didr_jax.objectives.posterior_drs import (ancestral_chain, jackknife_snis_coefficients,
                                               snis_correction, variance_table)
from tests.gaussian_refs import SCHED, affine_generator, affine_ta, gaussian_denoiser

MU, V0, BETA = 0.7, 0.6, 0.8


def _ref1d(x, t, cond=None, guided=False):
  return gaussian_denoiser(jnp.array([MU]), jnp.array([[V0]]))(x, t)


def _posterior(x, t):
  """q(x0 | x_t) for q0 = N(MU, V0): (mean, variance)."""
  a, s = SCHED.alpha_sigma(t)
  v_t = a ** 2 * V0 + s ** 2
  return MU + a * V0 / v_t * (x - a * MU), V0 * s ** 2 / v_t


def test_jackknife_coefficients_equal_explicit_leave_one_out():
  """T = M T_M - (M-1) mean_i T_(-i), each T a self-normalised minus plain mean, by explicit loops."""
  rng = np.random.default_rng(0)
  m, d = 5, 3
  log_w, x = rng.normal(size=(2, m)), rng.normal(size=(2, m, d))

  def t_of(lw, xs):
    w = np.exp(lw - lw.max())
    return (w[:, None] * xs).sum(0) / w.sum() - xs.mean(0)

  for b in range(2):
    loo = [t_of(np.delete(log_w[b], i), np.delete(x[b], i, axis=0)) for i in range(m)]
    expect = m * t_of(log_w[b], x[b]) - (m - 1) * np.mean(loo, axis=0)
    coef, _ = jackknife_snis_coefficients(jnp.asarray(log_w))
    np.testing.assert_allclose(np.einsum("m,md->d", np.asarray(coef[b]), x[b]), expect, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(coef[b])), 0.0, atol=1e-6)


@pytest.mark.parametrize("variance", ["local", "table"])
@pytest.mark.parametrize("k", [1, 3])
def test_chain_samples_the_exact_gaussian_posterior(variance, k):
  """For a Gaussian prior the x0 uncertainty is the same for every x_t, so DDPM steps with it added
  are exact: chain samples have the closed-form posterior mean and variance at any K."""
  n = 20_000
  t = jnp.full((n,), 0.6)
  x_t = jnp.full((n, 1), 0.4)
  x0_data = MU + jnp.sqrt(V0) * jax.random.normal(jax.random.PRNGKey(1), (50_000, 1))
  table = variance_table(_ref1d, SCHED, x0_data, None, jax.random.PRNGKey(2), jnp.linspace(1e-3, 1, 200))
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  x0 = jax.jit(lambda x, tt, kk: ancestral_chain(_ref1d, SCHED, x, tt, None, kk, k, table, variance))(
      x_t, t, keys)
  mean, var = _posterior(0.4, 0.6)
  np.testing.assert_allclose(float(jnp.mean(x0)), float(mean), atol=4 * float(jnp.sqrt(var / n)))
  np.testing.assert_allclose(float(jnp.var(x0)), float(var), rtol=0.03)
  if variance == "table":   # the table holds the posterior variance (constant for this prior)
    ts = jnp.array([0.2, 0.5, 0.9])
    np.testing.assert_allclose(np.interp(ts, table["t"], table["v"]), _posterior(0.0, ts)[1], rtol=0.03)


def test_chain_without_variance_correction_under_disperses():
  n = 20_000
  t, x_t = jnp.full((n,), 0.6), jnp.full((n, 1), 0.4)
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  x0 = ancestral_chain(_ref1d, SCHED, x_t, t, None, keys, 3, None, "none")
  assert float(jnp.var(x0)) < 0.8 * float(_posterior(0.4, 0.6)[1])


@pytest.mark.parametrize("variance", ["local", "table"])
def test_chain_variance_is_bounded_by_var_max(variance):
  """K = 1 draws x0 ~ N(D, v): with v_max below the posterior variance the samples have variance
  v_max exactly (a learned eps-network's local estimate can exceed the prior's variance 1000-fold
  at high noise; the bound is what a posterior variance can be)."""
  n = 20_000
  t, x_t = jnp.full((n,), 0.6), jnp.full((n, 1), 0.4)
  keys = jax.random.split(jax.random.PRNGKey(4), n)
  v_post = float(_posterior(0.4, 0.6)[1])
  table = {"t": jnp.array([0.0, 1.0]), "v": jnp.array([v_post, v_post])}
  x0 = ancestral_chain(_ref1d, SCHED, x_t, t, None, keys, 1, table, variance, var_max=0.5 * v_post)
  np.testing.assert_allclose(float(jnp.var(x0)), 0.5 * v_post, rtol=0.03)
  np.testing.assert_allclose(float(jnp.mean(x0)), float(_posterior(0.4, 0.6)[0]), atol=4 * np.sqrt(v_post / n))
  with pytest.raises(ValueError, match="snis_var_max"):
    ObjectiveConfig(snis_var_max=-1.0)


@pytest.mark.parametrize("m, rtol", [(8, 0.05), (32, 0.015)])
def test_snis_matches_the_tilted_gaussian_posterior(m, rtol):
  """Linear reward b x on a Gaussian posterior N(m, v): E_w[x0|x_t] - E[x0|x_t] = v b / beta.
  The jackknifed estimate's mean over rows approaches it as M grows (measured: -3.7 % at M = 8,
  -0.4 % at M = 32; the plain self-normalised estimate is biased by O(1/M))."""
  b, n = 0.9, 4096
  t = jax.random.uniform(jax.random.PRNGKey(0), (n,), minval=0.1, maxval=0.95)
  x_t = jax.random.normal(jax.random.PRNGKey(1), (n, 1))
  keys = jax.random.split(jax.random.PRNGKey(2), n)
  est, metrics = jax.jit(lambda x, tt, kk: snis_correction(
      _ref1d, lambda x0, c: b * x0[:, 0], SCHED, x, tt, None, kk, k=2, m=m, beta=BETA,
      variance="local"))(x_t, t, keys)
  exact = _posterior(x_t[:, 0], t)[1] * b / BETA
  np.testing.assert_allclose(float(jnp.mean(est[:, 0])), float(jnp.mean(exact)), rtol=rtol)
  assert 1.0 < float(jnp.mean(metrics["ess"])) <= m


def test_samples_do_not_depend_on_chunking():
  n = 16
  t = jnp.linspace(0.2, 0.9, n)
  x_t = jax.random.normal(jax.random.PRNGKey(1), (n, 1))
  keys = jax.random.split(jax.random.PRNGKey(2), n)
  run = lambda chunk: snis_correction(_ref1d, lambda x0, c: x0[:, 0], SCHED, x_t, t, None, keys, k=3,
                                      m=8, beta=BETA, variance="local", chunk=chunk)[0]
  chex.assert_trees_all_close(run(0), run(2), atol=1e-6)


@pytest.mark.parametrize("drs, rows", [("snis", 0), ("hybrid", 0), ("snis", 16)])
def test_didr_loss_uses_the_estimator_correction(drs, rows):
  """grad = mean_b w'(t) (D_ta - D_ref - T)^T dx0/dtheta with T the estimator's own output; with
  snis_rows = 16 of 64, T is the estimate x 4 on every 4th row and 0 elsewhere."""
  from tests.test_objectives import AFFINE, B as B2, _ref
  n = 64
  kz, kt, ke = jax.random.split(jax.random.PRNGKey(4), 3)
  z, eps = jax.random.normal(kz, (n, 2)), jax.random.normal(ke, (n, 2))
  t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
  keys = jax.random.split(jax.random.PRNGKey(5), n)
  cfg = ObjectiveConfig(method="didr", beta=BETA, drs=drs, snis_k=2, snis_m=4, snis_rows=rows)
  ta = affine_ta(AFFINE)
  reward = lambda x0, c: x0 @ B2

  def loss(p):
    return generator_loss(cfg, generate=lambda zz, c: affine_generator(p, zz), ta=ta, ref=_ref,
                          reward=reward, schedule=SCHED, z=z, cond=None, t=t, eps=eps, keys=keys)

  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(AFFINE)
  a, s = SCHED.alpha_sigma(t)
  x_t = a[:, None] * affine_generator(AFFINE, z) + s[:, None] * eps
  stride = n // rows if rows else 1
  sub, _ = snis_correction(lambda x, tt, c: _ref(x, tt, c, True), reward, SCHED, x_t[::stride],
                           t[::stride], None, keys[::stride], k=2, m=4, beta=BETA, variance="local")
  shift = jnp.zeros_like(x_t).at[::stride].set(stride * sub)
  if drs == "hybrid":   # K=1 DRP where a^2/s^2 >= 0.66: (s^2/a) J_D^T b / beta = Var(x0|x_t) b / beta
    d_jac = a * 0.7 / (a ** 2 * 0.7 + s ** 2)          # the reference's dD/dx (V0 = 0.7 there)
    drp = (s ** 2 / a * d_jac)[:, None] * B2 / BETA
    shift = jnp.where(((a / s) ** 2 >= 0.66)[:, None], drp, shift)
  g = ta(x_t, t)[0] - _ref(x_t, t)[0] - shift
  chex.assert_trees_all_close(grads["c"], g.mean(0), atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(grads["A"], jnp.einsum("bi,bj->ij", g, z) / n, atol=1e-5, rtol=1e-4)
  assert np.isfinite(float(metrics["snis_ess"]))


def test_estimators_that_need_keys_or_tables_say_so():
  cfg = ObjectiveConfig(method="didr", drs="snis", snis_variance="table")
  with pytest.raises(ValueError, match="variance table"):
    generator_loss(cfg, generate=lambda z, c: z, ta=_ref1d, ref=lambda x, t, c, g: _ref1d(x, t),
                   reward=lambda x, c: x[:, 0], schedule=SCHED, z=jnp.zeros((2, 1)), cond=None,
                   t=jnp.full((2,), 0.5), eps=jnp.zeros((2, 1)), keys=jax.random.split(jax.random.PRNGKey(0), 2))
  for bad, field in ((dict(snis_m=1), "snis_m"), (dict(snis_k=0), "snis_k"),
                     (dict(snis_m=8, snis_chunk=3), "snis_chunk"), (dict(snis_variance="x"), "snis_variance"),
                     (dict(hybrid_snr=0.0), "hybrid_snr"), (dict(drs="tweedie"), "drs")):
    with pytest.raises(ValueError, match=f"objective.{field}"):
      ObjectiveConfig(method="didr", **bad)
