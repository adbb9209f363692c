"""Schedules, parameterisation conversions, DDIM and CFG."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didr_jax.diffusion import (PREDICTIONS, Schedule, cfg, ddim_sample, ddim_step, from_denoiser,
                                score, to_denoiser)

SCHEDULES = [Schedule("discrete_vp"), Schedule("discrete_vp", betas="linear", beta_start=1e-4, beta_end=2e-2),
             Schedule("continuous_vp"), Schedule("continuous_vp", betas="cosine"), Schedule("rectified_flow"),
             Schedule("rectified_flow", shift=3.0)]


def _times(s: Schedule, n=7):
  lo, hi = s.t_range
  return jnp.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n)


@pytest.mark.parity
def test_discrete_schedule_matches_diffusers():
  from diffusers import DDPMScheduler
  for betas, start, end in (("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 2e-2)):
    ref = DDPMScheduler(beta_schedule=betas, beta_start=start, beta_end=end).alphas_cumprod.numpy()
    ours = Schedule("discrete_vp", betas=betas, beta_start=start, beta_end=end)
    a, s = ours.alpha_sigma(jnp.arange(1000))
    np.testing.assert_allclose(np.asarray(a) ** 2, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s) ** 2, 1 - ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parity
def test_shifted_flow_schedule_and_euler_step_match_diffusers():
  """Schedule("rectified_flow", shift=3) gives FlowMatchEulerDiscreteScheduler(shift=3)'s noise
  levels for the same unshifted times, and a DDIM step with a flow (eps - x0) prediction is its
  Euler step."""
  import torch
  from diffusers import FlowMatchEulerDiscreteScheduler
  ours = Schedule("rectified_flow", shift=3.0)
  u = np.array([0.97, 0.6, 0.25], np.float32)
  ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  ref.set_timesteps(sigmas=list(u))
  a, s = ours.alpha_sigma(jnp.asarray(u))
  np.testing.assert_allclose(np.asarray(s), ref.sigmas.numpy()[:3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(a), 1 - ref.sigmas.numpy()[:3], rtol=1e-6)
  rng = np.random.default_rng(0)
  x, v = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  for i in range(2):
    want = ref.step(torch.from_numpy(v), ref.timesteps[i], torch.from_numpy(x)).prev_sample.numpy()
    a_i, s_i = ours.alpha_sigma(u[i])
    d, eps = to_denoiser(v, x, a_i, s_i, "flow")
    got = ddim_step(d, eps, *ours.alpha_sigma(u[i + 1]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="schedule.shift 3.0"):
    Schedule("discrete_vp", shift=3.0)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.kind}-{s.betas}-{s.shift}")
def test_vp_and_flow_coefficients(sched):
  a, s = sched.alpha_sigma(_times(sched))
  if sched.kind == "rectified_flow":
    np.testing.assert_allclose(a + s, 1.0, atol=1e-6)
  else:
    np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, atol=1e-5)
  assert np.all(np.diff(np.asarray(a)) < 0), "a_t must decrease with t"


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: f"{s.kind}-{s.betas}-{s.shift}")
def test_conversions_round_trip(prediction, sched):
  t = _times(sched)

  @jax.jit
  def round_trip(key):
    k1, k2, k3 = jax.random.split(key, 3)
    a, s = sched.alpha_sigma(t)
    x0 = jax.random.normal(k1, (t.shape[0], 4, 3))
    eps = jax.random.normal(k2, x0.shape)
    x = a[:, None, None] * x0 + s[:, None, None] * eps
    # The exact network output for this (x0, eps) pair must map back to (x0, eps).
    d, e = to_denoiser(from_denoiser(x0, x, a, s, prediction), x, a, s, prediction)
    random_out = jax.random.normal(k3, x.shape)
    d2, _ = to_denoiser(random_out, x, a, s, prediction)
    return (d, x0), (e, eps), (score(d, x, a, s), -eps / s[:, None, None]), \
        (from_denoiser(d2, x, a, s, prediction), random_out)

  pairs = round_trip(jax.random.PRNGKey(0))
  for (got, want), atol in zip(pairs, (2e-4, 2e-4, 1e-3, 2e-4)):
    chex.assert_trees_all_close(got, want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("sched", SCHEDULES[::2], ids=lambda s: s.kind)
def test_ddim_exact_for_point_mass_prior(sched):
  """With q0 = delta(c) the exact denoiser is c everywhere; DDIM must land on c exactly."""
  c = jnp.array([[1.5, -0.5]])
  lo, hi = sched.t_range
  ts = jnp.linspace(hi * 0.99, lo + 0.01 * (hi - lo), 12)

  def denoise(x, t, cond):
    a, s = sched.alpha_sigma(t)
    d = jnp.broadcast_to(c, x.shape)
    return d, (x - a[:, None] * d) / s[:, None]

  z = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
  out = jax.jit(lambda z: ddim_sample(denoise, z, ts, sched))(z)
  chex.assert_trees_all_close(out, jnp.broadcast_to(c, out.shape), atol=1e-5)

  @jax.jit
  def one_step(z):
    # A single step keeps the trajectory on the exact probability-flow path x_t = a c + s eps.
    a0, s0 = sched.alpha_sigma(ts[:1])
    x = a0[:, None] * c + s0[:, None] * z
    d, e = denoise(x, jnp.full((5,), ts[0]), None)
    a1, s1 = sched.alpha_sigma(ts[1])
    return ddim_step(d, e, a1, s1), a1 * c + s1 * (x - a0[:, None] * c) / s0[:, None]

  chex.assert_trees_all_close(*one_step(z), atol=1e-5)


def test_cfg_augmented_equals_diffusers_form():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  oc, ou = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (3, 4))
  for w in (0.0, 1.0, 7.5):
    chex.assert_trees_all_close(cfg(oc, ou, w), ou + (1 + w) * (oc - ou), atol=1e-5)
  chex.assert_trees_all_close(cfg(oc, ou, 0.0), oc)


def test_bad_schedule_fields_named():
  with pytest.raises(ValueError, match="schedule.kind"):
    Schedule("ddpm")
  with pytest.raises(ValueError, match="schedule.betas"):
    Schedule("continuous_vp", betas="scaled_linear")
