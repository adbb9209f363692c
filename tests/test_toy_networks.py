"""The toy's monotone generator is increasing in z for any parameters, and can represent the steep
increasing map a two-mode target needs (the MLP's alternative, a fold, is what it rules out)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from didr_jax.toy.networks import MonotoneGenerator


def test_increasing_for_random_parameters():
  graph, params = nnx.split(MonotoneGenerator(16, 3, rngs=nnx.Rngs(0)))
  z = jnp.linspace(-6.0, 6.0, 2001)[:, None]
  for seed in range(5):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    # large perturbations of every parameter, of either sign
    noisy = tree.unflatten([x + 2.0 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    gen = nnx.merge(graph, noisy)
    x = np.asarray(gen(z))[:, 0]
    assert np.all(np.diff(x) > 0), seed
    slope = jax.vmap(jax.grad(lambda zz: gen(zz[None, None])[0, 0]))(z[:, 0])
    assert np.all(np.asarray(slope) > 0), seed


def test_fits_the_two_mode_transport_map():
  """Regression on the increasing map of N(0, 1) onto 0.12 N(-2, 0.25) + 0.88 N(2, 0.25) (the toy's
  p* shape, a near-jump at z = -1.175): the fitted push-forward has the target's mode statistics."""
  norm_cdf = jax.scipy.stats.norm.cdf
  grid = jnp.linspace(-6.0, 6.0, 20_001)
  cdf = 0.12 * norm_cdf(grid, -2.0, 0.5) + 0.88 * norm_cdf(grid, 2.0, 0.5)
  target = lambda z: jnp.interp(norm_cdf(z), cdf, grid)
  graph, params = nnx.split(MonotoneGenerator(32, 3, rngs=nnx.Rngs(1)))
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt, key):
    z = jax.random.normal(key, (1024, 1))
    grads = jax.grad(lambda p: jnp.mean((nnx.merge(graph, p)(z) - target(z)) ** 2))(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for key in jax.random.split(jax.random.PRNGKey(2), 1500):
    params, opt = step(params, opt, key)
  x = np.asarray(nnx.merge(graph, params)(jax.random.normal(jax.random.PRNGKey(3), (20_000, 1))))[:, 0]
  neg, pos = x[x < 0], x[x > 0]
  assert abs(len(neg) / len(x) - 0.12) < 0.01
  assert abs(neg.mean() + 2) < 0.1 and abs(neg.std() - 0.5) < 0.06
  assert abs(pos.mean() - 2) < 0.1 and abs(pos.std() - 0.5) < 0.06
