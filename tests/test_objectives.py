"""Objectives against closed forms: Gaussian prior + linear reward (docs/method.md 3.4), DRS, DRP, gradients."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from didr_jax.objectives import (GaussianMixture, ObjectiveConfig, drp_estimate, gauss_hermite_log_mgf,
                                 gaussian_linear_drs, generator_loss, mixture_drs, step_log_mgf)
from didr_jax.diffusion import Schedule
from didr_jax.objectives.generator import tbin_ratios
from didr_jax.training.metrics import reduce_chunk_metrics
from tests.gaussian_refs import SCHED, affine_generator, affine_ta, gaussian_denoiser

MU = jnp.array([0.5, -1.0])
V0 = 0.7
B = jnp.array([1.0, 0.5])
BETA = 0.8


def _xt(n=64, seed=0, t_lo=0.05, t_hi=0.95):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  t = jax.random.uniform(k1, (n,), minval=t_lo, maxval=t_hi)
  return 2.0 * jax.random.normal(k2, (n, 2)), t


def _ref(x, t, cond=None, guided=False):
  return gaussian_denoiser(MU, V0 * jnp.eye(2))(x, t)


def test_target_score_equals_closed_form():
  """s_ref + DRS = score of p*_t = N(a (mu + v0 b / beta), v_t)."""
  x, t = _xt()
  a, s = SCHED.alpha_sigma(t)
  v_t = a ** 2 * V0 + s ** 2
  s_ref = -(x - a[:, None] * MU) / v_t[:, None]
  target = -(x - a[:, None] * (MU + V0 * B / BETA)) / v_t[:, None]
  chex.assert_trees_all_close(s_ref + gaussian_linear_drs(a, s, V0, B, BETA), target, atol=1e-5)
  # The quadrature DRS of a one-component mixture with a first-coordinate linear reward agrees.
  b1 = jnp.array([1.3, 0.0])
  mix = GaussianMixture(((0.5, -1.0),), (V0 ** 0.5,), (1.0,))
  quad = jax.jit(lambda x, a, s: mixture_drs(mix, gauss_hermite_log_mgf(lambda x1: 1.3 * x1, BETA), x, a, s))(x, a, s)
  chex.assert_trees_all_close(quad, gaussian_linear_drs(a, s, V0, b1, BETA), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reward", ["sigmoid", "step"])
def test_mixture_drs_against_brute_force_quadrature(reward):
  """Exact mixture DRS vs an independent numpy computation of grad log h on a dense grid, for the
  smooth (Gauss-Hermite) and the step (closed-form) reward."""
  mix = GaussianMixture(((-2.0,), (2.0,)), (0.5, 0.5), (0.3, 0.7))
  beta, tau = 0.5, 0.25
  x = np.array([[-1.3], [0.2], [0.9]], np.float32)
  t = jnp.array([0.2, 0.5, 0.8])
  a, s = SCHED.alpha_sigma(t)
  log_mgf = (gauss_hermite_log_mgf(lambda x1: jax.nn.sigmoid(x1 / tau), beta) if reward == "sigmoid"
             else step_log_mgf(beta))
  ours = np.asarray(jax.jit(lambda x, a, s: mixture_drs(mix, log_mgf, x, a, s))(jnp.asarray(x), a, s))[:, 0]
  g = np.linspace(-8, 8, 40001)
  r = 1 / (1 + np.exp(-g / tau)) if reward == "sigmoid" else (g > 0).astype(np.float64)

  def log_h(xv, av, sv):
    prior = 0.3 * np.exp(-0.5 * ((g + 2) / 0.5) ** 2) + 0.7 * np.exp(-0.5 * ((g - 2) / 0.5) ** 2)
    post = prior * np.exp(-0.5 * ((xv - av * g) / sv) ** 2)
    return np.log(np.sum(post * np.exp(r / beta)) / np.sum(post))

  h = 1e-3
  for i in range(3):
    av, sv = float(a[i]), float(s[i])
    fd = (log_h(x[i, 0] + h, av, sv) - log_h(x[i, 0] - h, av, sv)) / (2 * h)
    np.testing.assert_allclose(ours[i], fd, rtol=2e-3, atol=1e-4)


def _k_step_jacobian(t, k, sched=SCHED):
  """Closed-form slope of Phi_K for the Gaussian prior: product of the DDIM step slopes."""
  a_of = lambda tt: sched.alpha_sigma(tt)
  slope = jnp.ones_like(t)
  for j in range(k, 1, -1):
    aj, sj = a_of(t * j / k)
    an, sn = a_of(t * (j - 1) / k)
    c = aj * V0 / (aj ** 2 * V0 + sj ** 2)
    slope = slope * (an * c + sn / sj * (1 - aj * c))
  a1, s1 = a_of(t / k)
  return slope * a1 * V0 / (a1 ** 2 * V0 + s1 ** 2)


@pytest.mark.parametrize("sched", [SCHED, Schedule("rectified_flow", shift=3.0)],
                         ids=["vp", "flow-shift3"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_drp_scan_closed_form(k, sched):
  """K=1 equals the exact DRS; K=2,4 equal the closed-form K-step DDIM Jacobian (biased); on the
  VP schedule and on the time-shifted flow schedule (Z-Image's), where DDIM steps are Euler steps
  of the flow ODE."""
  x, t = _xt()
  reward = lambda x0, c: x0 @ B
  ref = lambda x, t, cond=None, guided=False: gaussian_denoiser(MU, V0 * jnp.eye(2), sched)(x, t)
  drp, r_phi, d_first = jax.jit(lambda x, t: drp_estimate(ref, reward, sched, x, t, None, k, BETA))(x, t)
  expected = _k_step_jacobian(t, k, sched)[:, None] * B / BETA
  chex.assert_trees_all_close(drp, expected, atol=1e-5, rtol=1e-4)
  a, s = sched.alpha_sigma(t)      # the chain's first call is the posterior mean at (x_t, t)
  gain = (a * V0 / (a ** 2 * V0 + s ** 2))[:, None]
  chex.assert_trees_all_close(d_first, MU + gain * (x - a[:, None] * MU), atol=1e-5, rtol=1e-4)
  assert r_phi.shape == (x.shape[0],)
  exact = gaussian_linear_drs(a, s, V0, B, BETA)
  if k == 1:
    chex.assert_trees_all_close(drp, exact, atol=1e-5, rtol=1e-4)
  else:
    assert float(jnp.max(jnp.abs(drp - exact))) > 1e-3, "K > 1 should be biased for this prior"


AFFINE = {"A": jnp.array([[0.9, 0.2], [-0.1, 0.6]]), "c": jnp.array([0.1, 0.3])}


@pytest.mark.parametrize("drs", ["exact", "drp"])
def test_didr_pseudo_loss_gradient(drs):
  """grad = mean_b w(t) a_t (s_psi - s_ref - DRS)^T dx0/dtheta, w(t) = s^2 / a^2 (plain weighting)."""
  n = 128
  kz, kt, ke = jax.random.split(jax.random.PRNGKey(4), 3)
  z, eps = jax.random.normal(kz, (n, 2)), jax.random.normal(ke, (n, 2))
  t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
  cfg = ObjectiveConfig(method="didr", beta=BETA, drs=drs, drp_k=1)
  ta = affine_ta(AFFINE)
  a_t, s_t = SCHED.alpha_sigma(t)
  exact_drs = lambda x, tt, c: gaussian_linear_drs(*SCHED.alpha_sigma(tt), V0, B, BETA)

  def loss(p):
    return generator_loss(cfg, generate=lambda zz, c: affine_generator(p, zz), ta=ta, ref=_ref,
                          reward=lambda x0, c: x0 @ B, schedule=SCHED, z=z, cond=None, t=t, eps=eps,
                          exact_drs=exact_drs)

  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(AFFINE)
  x_t = a_t[:, None] * affine_generator(AFFINE, z) + s_t[:, None] * eps
  score = lambda dd: (a_t[:, None] * dd - x_t) / s_t[:, None] ** 2
  v = score(ta(x_t, t)[0]) - score(_ref(x_t, t)[0]) - exact_drs(x_t, t, None)
  coef = (s_t ** 2 / a_t ** 2 * a_t)[:, None] * v            # w(t) a_t (...)
  chex.assert_trees_all_close(grads["c"], coef.mean(0), atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(grads["A"], jnp.einsum("bi,bj->ij", coef, z) / n, atol=1e-5, rtol=1e-4)
  # the monitored ratio per t-bin: |(s^2/a) DRS| against |D_ta - D_ref| (docs/method.md section 3.4)
  shift = jnp.linalg.norm((s_t ** 2 / a_t)[:, None] * exact_drs(x_t, t, None), axis=-1)
  kl = jnp.linalg.norm(ta(x_t, t)[0] - _ref(x_t, t)[0], axis=-1)
  host = reduce_chunk_metrics({k: v[None] for k, v in metrics.items()})
  for lo, name in ((0.0, "t0.00-0.25"), (0.25, "t0.25-0.50"), (0.5, "t0.50-0.75"), (0.75, "t0.75-1.00")):
    m = (t >= lo) & (t < lo + 0.25)
    np.testing.assert_allclose(host[f"drs_to_kl/{name}"], float(jnp.sum(shift * m) / jnp.sum(kl * m)),
                               rtol=1e-4)
  np.testing.assert_allclose(host["reward_std"], float(jnp.std(affine_generator(AFFINE, z) @ B)), rtol=1e-4)


@pytest.mark.parametrize("method", ["di", "didr"])
def test_reward_is_computed_only_on_reporting_steps(method):
  """With a traced ``reward_metrics`` flag, DI and DIDR run the reward only when it is True (a
  runtime callback counts the calls); the chunk reduction averages the reported steps only."""
  n = 32
  kz, kt, ke = jax.random.split(jax.random.PRNGKey(9), 3)
  z, eps = jax.random.normal(kz, (n, 2)), jax.random.normal(ke, (n, 2))
  t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
  cfg = ObjectiveConfig(method=method, beta=BETA, drs="exact")
  exact_drs = lambda x, tt, c: gaussian_linear_drs(*SCHED.alpha_sigma(tt), V0, B, BETA)
  calls = []

  def reward(x0, c):
    jax.debug.callback(lambda: calls.append(1))
    return x0 @ B

  @jax.jit
  def metrics(p, on):
    return generator_loss(cfg, generate=lambda zz, c: affine_generator(p, zz), ta=affine_ta(AFFINE),
                          ref=_ref, reward=reward, schedule=SCHED, z=z, cond=None, t=t, eps=eps,
                          exact_drs=exact_drs, reward_metrics=on)[1]

  off = jax.block_until_ready(metrics(AFFINE, jnp.asarray(False)))
  jax.effects_barrier()
  assert calls == []
  moved = jax.tree.map(lambda v: v + 0.5, AFFINE)      # a second batch with another reward
  on = jax.block_until_ready(metrics(moved, jnp.asarray(True)))
  jax.effects_barrier()
  assert len(calls) == 1
  assert "reward" not in reduce_chunk_metrics({k: v[None] for k, v in off.items()})
  chunk = reduce_chunk_metrics({k: jnp.stack([off[k], on[k], off[k]]) for k in on})
  r = affine_generator(moved, z) @ B
  np.testing.assert_allclose(chunk["reward"], float(jnp.mean(r)), rtol=1e-5)
  np.testing.assert_allclose(chunk["reward_std"], float(jnp.std(r)), rtol=1e-5)


def test_ratio_metrics_sum_over_the_chunk_and_drop_empty_bins():
  sched = Schedule(kind="discrete_vp", betas="scaled_linear")
  t = jnp.array([0.0, 100.0, 600.0, 999.0])
  step = tbin_ratios("r", sched, t, jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([1.0, 1.0, 1.0, 2.0]))
  assert sorted(step) == ["ratio:r/t000-250", "ratio:r/t250-500", "ratio:r/t500-750", "ratio:r/t750-1000"]
  chunk = {k: jnp.stack([v, 2.0 * v]) for k, v in step.items()}      # two steps of a chunk
  chunk["loss"] = jnp.array([1.0, 3.0])
  assert reduce_chunk_metrics(chunk) == {"r/t000-250": 1.5, "r/t500-750": 3.0, "r/t750-1000": 2.0,
                                         "loss": 2.0}


def test_affine_generator_converges_to_p_star():
  """DIDR with exact scores (exact TA, reference and DRS) drives an affine generator to p*."""
  mu, v0, b, beta = jnp.array([0.5]), 0.7, jnp.array([1.0]), 0.8
  ref = lambda x, t, c=None, g=False: gaussian_denoiser(mu, v0 * jnp.eye(1))(x, t)
  cfg = ObjectiveConfig(method="didr", beta=beta, drs="exact")
  exact_drs = lambda x, tt, c: gaussian_linear_drs(*SCHED.alpha_sigma(tt), v0, b, beta)
  tx = optax.adam(optax.cosine_decay_schedule(2e-2, 3000))
  params = {"A": jnp.array([[0.3]]), "c": jnp.array([-1.0])}
  n = 4096

  def step(carry, key):
    p, opt = carry
    kz, kt, ke = jax.random.split(key, 3)
    z, eps = jax.random.normal(kz, (n, 1)), jax.random.normal(ke, (n, 1))
    t = jax.random.uniform(kt, (n,), minval=0.02, maxval=0.98)
    ta = affine_ta(jax.lax.stop_gradient(p))
    g = jax.grad(lambda q: generator_loss(
        cfg, generate=lambda zz, c: affine_generator(q, zz), ta=ta, ref=ref,
        reward=lambda x0, c: x0 @ b, schedule=SCHED, z=z, cond=None, t=t, eps=eps,
        exact_drs=exact_drs)[0])(p)
    upd, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, upd), opt), None

  (params, _), _ = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))(
      (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(0), 3000))
  target_mean, target_std = float(mu[0] + v0 * b[0] / beta), v0 ** 0.5
  assert abs(float(params["c"][0]) - target_mean) <= 0.02 * abs(target_mean), params
  assert abs(abs(float(params["A"][0, 0])) - target_std) <= 0.02 * target_std, params


def _fd_grad(f, p, h=1e-4):
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  out = []
  for i in range(flat.shape[0]):
    e = jnp.zeros_like(flat).at[i].set(h)
    out.append((f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * h))
  return unravel(jnp.stack(out))


@pytest.mark.parametrize("method", ["dipp", "distar"])
def test_dipp_and_distar_gradients_match_finite_differences(method):
  import jax.flatten_util  # noqa: F401
  with jax.enable_x64(True):
    n = 16
    kz, kt, ke = jax.random.split(jax.random.PRNGKey(7), 3)
    z = jax.random.normal(kz, (n, 2), jnp.float64)
    eps = jax.random.normal(ke, (n, 2), jnp.float64)
    t = jax.random.uniform(kt, (n,), jnp.float64, 0.1, 0.9)
    p0 = jax.tree.map(lambda v: v.astype(jnp.float64), AFFINE)
    ta = gaussian_denoiser(jnp.array([0.2, 0.1]), jnp.array([[0.8, 0.1], [0.1, 0.5]]))
    reward = lambda x0, c: jax.nn.sigmoid(x0[:, 0] / 0.7) + 0.1 * jnp.sin(x0[:, 1])
    cfg = ObjectiveConfig(method=method, alpha_rew=2.0, distar_c=0.5)
    loss = lambda p: generator_loss(cfg, generate=lambda zz, c: affine_generator(p, zz), ta=ta, ref=_ref,
                                    reward=reward, schedule=SCHED, z=z, cond=None, t=t, eps=eps)[0]
    grads = jax.jit(jax.grad(loss))(p0)
    if method == "distar":
      reference = _fd_grad(jax.jit(loss), p0)     # no stop-gradients: the loss itself is differentiated
    else:
      # DI++: -alpha r(x0(theta)) + mean sum g0 . x0(theta) with g0 = D_ta - D_ref frozen at theta0.
      a, s = SCHED.alpha_sigma(t)
      x_t = a[:, None] * affine_generator(p0, z) + s[:, None] * eps
      g0 = ta(x_t, t)[0] - _ref(x_t, t)[0]
      surrogate = lambda p: (-2.0 * jnp.mean(reward(affine_generator(p, z), None))
                             + jnp.mean(jnp.sum(g0 * affine_generator(p, z), -1)))
      reference = _fd_grad(jax.jit(surrogate), p0)
    chex.assert_trees_all_close(grads, reference, atol=1e-7, rtol=1e-5)


def test_objective_config_errors_name_the_field():
  for kwargs, field in (({"beta": 0.0}, "beta"), ({"drp_k": 0}, "drp_k"), ({"method": "ppo"}, "method"),
                        ({"weighting": "edm"}, "weighting")):
    with pytest.raises(ValueError, match=f"objective.{field}"):
      ObjectiveConfig(**kwargs)


def test_drp_t_max_cuts_only_the_drp_term():
  """With t > t_max everywhere, DIDR-DRP's gradient equals DI's; the exact DRS is never cut."""
  n = 32
  kz, ke = jax.random.split(jax.random.PRNGKey(9))
  z, eps = jax.random.normal(kz, (n, 2)), jax.random.normal(ke, (n, 2))
  t = jnp.full((n,), 0.7)
  exact_drs = lambda x, tt, c: gaussian_linear_drs(*SCHED.alpha_sigma(tt), V0, B, BETA)

  def grad(cfg):
    return jax.jit(jax.grad(lambda p: generator_loss(
        cfg, generate=lambda zz, c: affine_generator(p, zz), ta=affine_ta(AFFINE), ref=_ref,
        reward=lambda x0, c: x0 @ B, schedule=SCHED, z=z, cond=None, t=t, eps=eps,
        exact_drs=exact_drs)[0]))(AFFINE)

  di = grad(ObjectiveConfig(method="di"))
  chex.assert_trees_all_close(grad(ObjectiveConfig(method="didr", drs="drp", drp_k=1, beta=BETA,
                                                   drp_t_max=0.5)), di, atol=1e-6)
  drp_on = grad(ObjectiveConfig(method="didr", drs="drp", drp_k=1, beta=BETA))
  exact_cut = grad(ObjectiveConfig(method="didr", drs="exact", beta=BETA, drp_t_max=0.5))
  assert float(jnp.max(jnp.abs(drp_on["c"] - di["c"]))) > 1e-3
  chex.assert_trees_all_close(exact_cut, drp_on, atol=1e-4, rtol=1e-4)   # K=1 DRP is exact here
