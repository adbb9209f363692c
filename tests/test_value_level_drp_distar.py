"""Value-level tests of the DRP (K = 2, rounded discrete grid) and DI* on the analytic conditional
Gaussian T2I task of tests/test_value_level.py, against closed forms computed here in numpy.

Every reference call is affine in x for a Gaussian denoiser, guided or not:
D(x) = (1 - a g) mu + g x with gain g = a v / (a^2 v + s^2), and D~ = (1 + w) D_c - w D_u.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax.objectives import ObjectiveConfig, generator_loss
from didr_jax.objectives.drs import step_grid
from didr_jax.objectives.generator import diffused_reward_shift
from didr_jax.pipelines import experiment
from tests.test_value_level import (B, B_REW, BETA, DIM, GEN, REF, SHAPE, TA, GaussEps, didr_task,
                                    affine_generator, flat, linear_reward, make_cond, np_as,
                                    np_features, np_gauss, np_uncond_features, sgd_generator_step,
                                    t2i_task)

sg = jax.lax.stop_gradient


def np_guided(f_c, f_u, x, t, w):
  """(D~, slope dD~/dx) of the guided reference: (1 + w) D_c - w D_u."""
  d_c, _, g_c, _, _ = np_gauss(REF, f_c, x, t)
  d_u, _, g_u, _, _ = np_gauss(REF, f_u, x, t)
  return d_c + w * (d_c - d_u), (1 + w) * g_c - w * g_u


# ---- 3. the DRP at K = 2 on the rounded integer grid ---------------------------------------------

@pytest.mark.parametrize("cfg_w", [0.0, 7.5])
def test_drp_k2_on_the_rounded_grid_equals_the_analytic_jacobian(cfg_w):
  """Phi_2(x_t) = D~(x_1, t_1), x_1 = a_1 D~(x_t, t) + s_1 eps~(x_t, t), t_1 = round(t / 2);
  T = (s_t^2 / a_t) DRP with DRP = J^T grad r(Phi_2) / beta and J = dPhi_2/dx_t =
  G(t_1) ((a_1 - s_1 a_t / s_t) G(t) + s_1 / s_t) I (G: the guided gain), for the concave
  quadratic reward r = b . x0 + (q/2) |x0|^2, so both Phi_2 and J enter."""
  beta, q = 0.5, -0.4
  graph, ref = nnx.split(GaussEps(REF))
  task, _ = t2i_task("sdxl", graph)
  obj = ObjectiveConfig(method="didr", drs="drp", drp_k=2, beta=beta, cfg_w=cfg_w)
  t = np.asarray([20, 21, 99, 333, 400, 501, 777, 980], np.float32)
  x_t = np.random.default_rng(11).normal(size=(B,) + SHAPE).astype(np.float32)
  cond = make_cond("sdxl", 12)
  b = jnp.asarray(B_REW, jnp.float32)

  def reward(x0, c):
    x0 = x0.reshape(x0.shape[0], -1)
    return x0 @ b + 0.5 * q * jnp.sum(x0 ** 2, -1)

  @jax.jit
  def run(p, x, tt, c):
    shift, metrics = diffused_reward_shift(obj, ref=task.denoiser(p, cfg_w), reward=reward,
                                           schedule=task.schedule, x_t=x, t=tt, cond=c)
    return shift, metrics, step_grid(task.schedule, tt, 1, 2), step_grid(task.schedule, tt, 2, 2)

  shift, metrics, t1, t2 = run(ref, jnp.asarray(x_t), jnp.asarray(t), cond)
  t1 = np.asarray(t1)
  np.testing.assert_array_equal(np.asarray(t2), t)
  np.testing.assert_array_equal(t1, [10, 10, 50, 166, 200, 250, 388, 490])   # half to even
  f_c, f_u = np_features(cond, "sdxl"), np_uncond_features(B, "sdxl")
  x = flat(x_t)
  a2, s2 = np_as(t)
  a1, s1 = np_as(t1)
  d2, g2 = np_guided(f_c, f_u, x, t, cfg_w)
  x1 = a1[:, None] * d2 + s1[:, None] * (x - a2[:, None] * d2) / s2[:, None]
  phi, g1 = np_guided(f_c, f_u, x1, t1, cfg_w)
  jac = g1 * ((a1 - s1 * a2 / s2) * g2 + s1 / s2)
  drp = jac[:, None] * (B_REW + q * phi) / beta
  np.testing.assert_allclose(flat(shift), (s2 ** 2 / a2)[:, None] * drp, rtol=2e-4, atol=1e-5)
  r_phi = phi @ B_REW + 0.5 * q * np.sum(phi ** 2, -1)
  np.testing.assert_allclose(metrics["drp_reward"], np.mean(r_phi), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_didr_drp_generator_step_takes_d_ref_from_the_chains_first_call(k):
  """The t2i default objective (dmd2, cfg_w = 7.5) with the DRP: grad = mean_b w'_b (D_ta - D~ -
  (s^2/a) DRP_b) dx0_b/dtheta with w' = 1 / mean|x0 - D~(x_t, t)|. The trainer takes D~(x_t, t)
  from the DRP chain's first reference call instead of a second call: a chain that started at any
  other time (t_1 = round(t / 2) at K = 2) would move w' and the KL part."""
  task, obj, ref, ta = didr_task()
  obj = dataclasses.replace(obj, drs="drp", drp_k=k)
  cond = make_cond("sdxl", 9)
  grad, metrics, z, t, eps = sgd_generator_step(task, obj, ta, ref, cond, seed=5)
  a2, s2 = np_as(t)
  x0 = z @ GEN["A"].T + GEN["c"]
  x = a2[:, None] * x0 + s2[:, None] * eps
  f_c, f_u = np_features(cond, "sdxl"), np_uncond_features(B, "sdxl")
  d2, g2 = np_guided(f_c, f_u, x, t, 7.5)
  if k == 1:
    jac = g2
  else:
    t1 = np.round(t / 2)
    a1, s1 = np_as(t1)
    _, g1 = np_guided(f_c, f_u, a1[:, None] * d2 + s1[:, None] * (x - a2[:, None] * d2) / s2[:, None],
                      t1, 7.5)
    jac = g1 * ((a1 - s1 * a2 / s2) * g2 + s1 / s2)
  shift = (s2 ** 2 / a2 * jac / BETA)[:, None] * B_REW
  w = 1.0 / np.mean(np.abs(x0 - d2), axis=1)
  g = w[:, None] * (np_gauss(TA, f_c, x, t)[0] - d2 - shift)
  scale = float(np.max(np.abs(g)))       # float32 steps; s^2/a reaches 120 at t = 980
  np.testing.assert_allclose(grad["c"], g.mean(0), rtol=5e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(grad["A"], g.T @ z / B, rtol=5e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(metrics["drs_grad_norm"],
                             np.mean(np.linalg.norm(w[:, None] * shift, axis=1)), rtol=1e-5)


# ---- 4. DI*: cfg_placement "out" and "in", values and gradients ----------------------------------

def np_distar(placement, cfg_w, alpha, c_h, z, t, eps, cond, ta_p):
  """(loss, dL/dA, dL/dc, mean Pseudo-Huber) of
  L = -alpha mean r(x0) - mean_b W d'(y)^T (s_ta + eps / s) [- mean_b sum sg(D~ - D_c) x0 for "out"],
  y = s_ta - s_in, d'(y) = y / sqrt(|y|^2 + c^2), W = s^2 / a, gradients through x_t into both
  factors (every score is affine in x_t: ds/dx = (a g - 1) / s^2)."""
  a, s = np_as(t)
  x0 = z @ GEN["A"].T + GEN["c"]
  x_t = a[:, None] * x0 + s[:, None] * eps
  f_c, f_u = np_features(cond, "sdxl"), np_uncond_features(B, "sdxl")
  d_ta, _, g_ta, _, _ = np_gauss(ta_p, f_c, x_t, t)
  d_c, _, g_c, _, _ = np_gauss(REF, f_c, x_t, t)
  d_in, g_in = np_guided(f_c, f_u, x_t, t, cfg_w) if placement == "in" else (d_c, g_c)
  col = lambda v: v[:, None]
  s_ta = (col(a) * d_ta - x_t) / col(s ** 2)
  y = s_ta - (col(a) * d_in - x_t) / col(s ** 2)
  k_ta, kappa = (a * g_ta - 1) / s ** 2, (a * g_ta - a * g_in) / s ** 2      # ds_ta/dx, dy/dx
  n = np.sqrt(np.sum(y ** 2, -1) + c_h ** 2)
  u = s_ta + eps / col(s)
  grad_x = col(kappa) * (u / col(n) - y * col(np.sum(y * u, -1) / n ** 3)) + col(k_ta / n) * y
  w = s ** 2 / a
  loss = np.mean(-alpha * (x0 @ B_REW) - w * np.sum(y * u, -1) / n)
  dl_dx0 = (-alpha * B_REW - col(w * a) * grad_x) / B
  if placement == "out" and cfg_w:
    implicit = np_guided(f_c, f_u, x_t, t, cfg_w)[0] - d_c          # w (D_c - D_u)
    loss -= np.mean(np.sum(implicit * x0, -1))
    dl_dx0 -= implicit / B
  return loss, dl_dx0.T @ z, dl_dx0.sum(0), np.mean(n - c_h)


def distar_setup(placement, **objective):
  graph, ref = nnx.split(GaussEps(REF))
  _, ta = nnx.split(GaussEps(TA))
  task, cfg = t2i_task("sdxl", graph)
  task = dataclasses.replace(task, generator_apply=affine_generator, reward_apply=linear_reward)
  cfg.method, cfg.objective.cfg_placement, cfg.objective.weighting = "distar", placement, "plain"
  for k, v in objective.items():
    setattr(cfg.objective, k, v)
  return task, experiment.objective_config(cfg), ref, ta


@pytest.mark.parametrize("placement", ["out", "in"])
def test_distar_generator_step_equals_closed_form(placement):
  """The SDXL DI* objective (cfg_w = 7.5) through the real generator update: loss value,
  Pseudo-Huber metric and gradient (alpha_rew = 2 keeps the divergence term visible; c = 0.7, not
  the default 1, tells c from c^2)."""
  task, obj, ref, ta = distar_setup(placement, alpha_rew=2.0, distar_c=0.7)
  assert (obj.cfg_w, obj.distar_c, obj.cfg_placement) == (7.5, 0.7, placement)
  cond = make_cond("sdxl", 13)
  grad, metrics, z, t, eps = sgd_generator_step(task, obj, ta, ref, cond, seed=1)
  loss, g_a, g_c, huber = np_distar(placement, 7.5, 2.0, 0.7, z, t, eps, cond, TA)
  np.testing.assert_allclose(metrics["gen_loss"], loss, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(metrics["pseudo_huber"], huber, rtol=1e-4)
  np.testing.assert_allclose(grad["c"], g_c, rtol=5e-5, atol=5e-6)
  np.testing.assert_allclose(grad["A"], g_a, rtol=5e-5, atol=5e-6)


def test_distar_zero_divergence_gradient_when_the_ta_is_the_reference():
  """y = 0 (TA = plain conditional reference): the divergence term gives no gradient; with
  placement "out" what is left is the implicit CFG reward, grad = -mean_b w (D_c - D_u) dx0/dtheta."""
  cond = make_cond("sdxl", 14)
  task, obj, ref, _ = distar_setup("out", alpha_rew=0.0)
  grad, metrics, z, t, eps = sgd_generator_step(task, obj, ref, ref, cond, seed=2)
  a, s = np_as(t)
  x_t = a[:, None] * (z @ GEN["A"].T + GEN["c"]) + s[:, None] * eps
  f_c = np_features(cond, "sdxl")
  d_g = np_guided(f_c, np_uncond_features(B, "sdxl"), x_t, t, 7.5)[0]
  implicit = d_g - np_gauss(REF, f_c, x_t, t)[0]                     # w (D_c - D_u)
  np.testing.assert_allclose(grad["c"], -implicit.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad["A"], -implicit.T @ z / B, rtol=1e-4, atol=1e-5)
  assert metrics["pseudo_huber"] == 0.0
  task, obj, ref, _ = distar_setup("in", alpha_rew=0.0, cfg_w=0.0)
  grad, _, _, _, _ = sgd_generator_step(task, obj, ref, ref, cond, seed=2)
  assert max(np.max(np.abs(v)) for v in grad.values()) < 1e-6


def test_distar_large_c_limit_has_the_sid_sign_and_weight():
  """For c >> |y|, d'(y) -> y / c and DI* becomes SiD's alpha = 1 surrogate. Generator N(c0, sigma^2 I)
  with its exact TA, reference N(m, v I), p_t = N(a c0, v_g) and q_t = N(a m, v_r): the expected
  gradient is c E[grad_c] = W a^2 (c0 - m) / (v_g v_r) and c E[grad_A] = 2 W a^2 sigma
  (1/v_r - 1/v_g) / v_g I, W = s^2/a (docs/method.md 3.3), so descent moves c0 toward m and
  shrinks an over-wide generator. (The gradient of W E|y|^2 / (2c) itself has 1/v_r^2 in place of
  1/(v_g v_r) and (1/v_r - 1/v_g)(1/v_r + 1/v_g) in place of 2 (1/v_r - 1/v_g) / v_g: the surrogate
  drops E[d'(y)^T (dy/dx_t) dx_t/dtheta] and shares the divergence's sign and zero, not its size.)
  The expectation over (z, eps) is exact on the 4 DIM symmetric sigma points +-sqrt(2 DIM) e_i,
  since the limit's gradient is at most quadratic in them."""
  c_h, sigma = 1e3, 0.8
  c0 = 0.6 * np.random.default_rng(15).normal(size=DIM)
  ta_p = {"mu0": c0, "mw": np.zeros((3, DIM)), "log_v0": np.log(sigma ** 2), "vw": np.zeros(3)}
  graph, ref = nnx.split(GaussEps(REF))
  _, ta = nnx.split(GaussEps(ta_p))
  task, _ = t2i_task("sdxl", graph)
  obj = ObjectiveConfig(method="distar", alpha_rew=0.0, distar_c=c_h, cfg_placement="in", cfg_w=0.0)
  ts = np.asarray([50, 300, 600, 900])
  points = np.sqrt(2 * DIM) * np.concatenate([np.eye(2 * DIM), -np.eye(2 * DIM)])
  n = len(ts) * len(points)
  z = np.tile(points[:, :DIM], (len(ts), 1)).reshape((n,) + SHAPE)
  eps = np.tile(points[:, DIM:], (len(ts), 1)).reshape((n,) + SHAPE)
  t = np.repeat(ts, len(points)).astype(np.float32)
  cond = jax.tree.map(lambda v: jnp.repeat(v[:1], n, axis=0), make_cond("sdxl", 16))
  gen = {"A": sigma * jnp.eye(DIM), "c": jnp.asarray(c0, jnp.float32)}
  ta_fn, ref_fn = task.denoiser(sg(ta)), task.denoiser(sg(ref), 0.0)

  def loss(p):
    return generator_loss(obj, generate=lambda zz, c: affine_generator(p, zz, c), ta=ta_fn, ref=ref_fn,
                          reward=lambda x0, c: linear_reward(None, x0, c), schedule=task.schedule,
                          z=jnp.asarray(z, jnp.float32), cond=cond, t=jnp.asarray(t),
                          eps=jnp.asarray(eps, jnp.float32))[0]

  grad = jax.tree.map(lambda g: c_h * np.asarray(g, np.float64), jax.jit(jax.grad(loss))(gen))
  _, _, _, m, v = np_gauss(REF, np_features(cond, "sdxl")[:1], np.zeros((1, DIM)), ts[:1])
  a, s = np_as(ts)
  v_g, v_r, w = a ** 2 * sigma ** 2 + s ** 2, a ** 2 * v[0] + s ** 2, s ** 2 / a
  expect_c = np.mean(w * a ** 2 / (v_g * v_r)) * (c0 - m[0])
  expect_a = np.mean(2 * w * a ** 2 * sigma * (1 / v_r - 1 / v_g) / v_g)
  np.testing.assert_allclose(grad["c"], expect_c, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(grad["A"], expect_a * np.eye(DIM), atol=2e-4 * abs(expect_a))
  assert float(-grad["c"] @ (m[0] - c0)) > 0 and (expect_a > 0) == (sigma ** 2 > v[0])
