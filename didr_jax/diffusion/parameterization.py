"""Conversions between network outputs and (denoiser D, eps estimate, score); DDIM; CFG.

With x_t = a x0 + s eps (docs/method.md section 1.2):
  eps  : D = (x - s out) / a          eps_hat = out
  x0   : D = out                      eps_hat = (x - a out) / s
  v    : D = a x - s v                eps_hat = s x + a v        (v = a eps - s x0, VP: a^2 + s^2 = 1)
  flow : D = x - s u                  eps_hat = x + a u          (u = eps - x0, a = 1 - sigma, s = sigma)
The v and flow forms are computed for general (a, s) (dividing by a^2 + s^2 and a + s), which
reduces to the table on the processes they belong to.
score = (a D - x) / s^2 = -eps_hat / s.
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "flow")


def at_least_f32(x):
  """Cast to float32 unless already wider (float64 stays float64 for tests and analysis)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def broadcast_to(c, x):
  """Per-example coefficient [B] (or scalar) -> broadcastable against x [B, ...]."""
  c = at_least_f32(c)
  if c.ndim == 0:
    return c
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def to_denoiser(out, x, a, s, prediction: str):
  """(D, eps_hat) in float32 from a network output of the given prediction type."""
  out = at_least_f32(out)
  x = at_least_f32(x)
  a, s = broadcast_to(a, x), broadcast_to(s, x)
  if prediction == "eps":
    return (x - s * out) / a, out
  if prediction == "x0":
    return out, (x - a * out) / s
  if prediction == "v":
    n = a ** 2 + s ** 2
    return (a * x - s * out) / n, (s * x + a * out) / n
  if prediction == "flow":
    n = a + s
    return (x - s * out) / n, (x + a * out) / n
  raise ValueError(f"prediction {prediction!r} unknown; choose one of {PREDICTIONS}")


def from_denoiser(d, x, a, s, prediction: str):
  """The network output that :func:`to_denoiser` maps to denoiser ``d`` at ``x``."""
  a, s = broadcast_to(a, x), broadcast_to(s, x)
  eps = (x - a * d) / s
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return d
  if prediction == "v":
    return a * eps - s * d
  if prediction == "flow":
    return eps - d
  raise ValueError(f"prediction {prediction!r} unknown; choose one of {PREDICTIONS}")


def score(d, x, a, s):
  """grad_x log p_t(x) = (a D - x) / s^2."""
  a, s = broadcast_to(a, x), broadcast_to(s, x)
  return (a * d - x) / s ** 2


def ddim_step(d, eps_hat, a_next, s_next):
  """Deterministic DDIM / probability-flow step to t': x' = a' D + s' eps_hat."""
  return broadcast_to(a_next, d) * d + broadcast_to(s_next, d) * eps_hat


def cfg(out_c, out_u, w):
  """Classifier-free guidance, augmented convention: out_c + w (out_c - out_u).

  ``w = 0`` is no guidance; it equals diffusers' ``guidance_scale = 1 + w``.
  """
  return out_c + w * (out_c - out_u)
