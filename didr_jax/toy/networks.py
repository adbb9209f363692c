"""Small networks of the toy: an eps-predicting denoiser with a sinusoidal time embedding and a
one-step generator z -> x0 (an MLP, or in 1-D a monotone map)."""
from __future__ import annotations

import jax
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


class MonotoneGenerator(nnx.Module):
  """An increasing map R -> R: tanh layers with positive weights (exp of free parameters), a
  positive output layer and a positive linear skip.

  Every law on R is the push-forward of N(0, 1) by an increasing map, and the 1-D probability-flow
  map the generator distils is increasing, so this class loses nothing the 1-D toy needs; moving
  mass between modes is then a shift of the map's steep part, where an MLP folds (docs/method.md 5).
  """

  def __init__(self, width: int, depth: int, *, rngs: nnx.Rngs):
    keys = jax.random.split(rngs.params(), depth + 1)
    # first layer tanh(rate (z - center)): a step's location is one parameter, in latent units
    self.centers = nnx.Param(jnp.linspace(-3.0, 3.0, width, dtype=jnp.float32))
    self.log_rate = nnx.Param(0.3 * jax.random.normal(keys[0], (width,), jnp.float32))
    log_w, bias = [], []
    for k in keys[1:depth]:    # inputs in (-1, 1): weights ~ 2 / width keep pre-activations O(1)
      log_w.append(jnp.log(2.0 / width) + 0.3 * jax.random.normal(k, (width, width), jnp.float32))
      bias.append(jnp.linspace(-0.5, 0.5, width, dtype=jnp.float32))
    self.log_w = nnx.List([nnx.Param(w) for w in log_w])
    self.bias = nnx.List([nnx.Param(b) for b in bias])
    self.log_out = nnx.Param(jnp.log(1.0 / width) + 0.3 * jax.random.normal(keys[depth], (width,), jnp.float32))
    self.log_skip = nnx.Param(jnp.asarray(jnp.log(0.1), jnp.float32))
    self.out_bias = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, z):
    h = jnp.tanh(jnp.exp(self.log_rate[...]) * (z - self.centers[...]))
    for log_w, bias in zip(self.log_w, self.bias):
      h = jnp.tanh(h @ jnp.exp(log_w[...]) + bias[...])
    x = h @ jnp.exp(self.log_out[...]) + jnp.exp(self.log_skip[...]) * z[:, 0] + self.out_bias[...]
    return x[:, None]


def make_generator(dim: int, kind: str, width: int, depth: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The toy's generator of ``generator.kind``: "mlp" (any dim) or "monotone" (dim 1)."""
  if kind == "monotone":
    return MonotoneGenerator(width, depth, rngs=rngs)
  return Generator(dim, width, depth, rngs=rngs)
