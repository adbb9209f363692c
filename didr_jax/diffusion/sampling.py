"""Deterministic multi-step DDIM sampling as a ``lax.scan`` (reference samples, distillation targets)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.diffusion.parameterization import ddim_step


def ddim_sample(denoise, x_init, ts, schedule, cond=None):
  """Run DDIM from x_init at ts[0] through ts[1:], returning D at ts[-1] (len(ts) network calls).

  ``denoise(x, t[B], cond) -> (D, eps_hat)``; ``ts`` is a decreasing 1-D array of times.
  """
  n = x_init.shape[0]

  def body(x, t_pair):
    t, t_next = t_pair
    d, eps_hat = denoise(x, jnp.full((n,), t), cond)
    a_next, s_next = schedule.alpha_sigma(t_next)
    return ddim_step(d, eps_hat, a_next, s_next), None

  x, _ = jax.lax.scan(body, x_init, (ts[:-1], ts[1:]))
  d, _ = denoise(x, jnp.full((n,), ts[-1]), cond)
  return d
