"""Small MLPs of the toy: an eps-predicting denoiser with a sinusoidal time embedding and a
one-step generator z -> x0."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from didr_jax.models.layers import dense


def time_embedding(t, dim: int, scale: float = 1000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled to the 0..1000 range of image models)."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * scale)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class MLP(nnx.Module):
  def __init__(self, din: int, dout: int, width: int, depth: int, *, rngs: nnx.Rngs):
    dims = [din] + [width] * depth
    self.hidden = nnx.List([dense(i, o, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])])
    self.out = dense(width, dout, rngs=rngs)

  def __call__(self, h):
    for layer in self.hidden:
      h = nnx.silu(layer(h))
    return self.out(h)


class Denoiser(nnx.Module):
  """eps_hat(x_t, t): the toy reference / TA network."""

  def __init__(self, dim: int, width: int, depth: int, time_dim: int, *, rngs: nnx.Rngs):
    self.time_dim = time_dim
    self.mlp = MLP(dim + time_dim, dim, width, depth, rngs=rngs)

  def __call__(self, x, t):
    return self.mlp(jnp.concatenate([x, time_embedding(t, self.time_dim)], axis=-1))


class Generator(nnx.Module):
  """g_theta(z) -> x0."""

  def __init__(self, dim: int, width: int, depth: int, *, rngs: nnx.Rngs):
    self.mlp = MLP(dim, dim, width, depth, rngs=rngs)

  def __call__(self, z):
    return self.mlp(z)
