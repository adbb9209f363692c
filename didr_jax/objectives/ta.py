"""Teaching-assistant loss: eps-MSE denoising score matching on stop-gradient generator samples."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from didr_jax.diffusion import at_least_f32, broadcast_to


def dsm_loss(denoise, x0, t, eps, schedule, cond=None):
  """E || eps_hat(x_t, t) - eps ||^2 (mean over all elements), x_t = a x0 + s eps.

  ``denoise(x_t, t, cond) -> (D, eps_hat)``; x0 is stop-gradiented (generator samples are data).
  """
  x0 = at_least_f32(jax.lax.stop_gradient(x0))
  a, s = schedule.alpha_sigma(t)
  x_t = broadcast_to(a, x0) * x0 + broadcast_to(s, x0) * eps
  _, eps_hat = denoise(x_t, t, cond)
  loss = jnp.mean((eps_hat - eps) ** 2)
  return loss, {"ta_loss": loss}
