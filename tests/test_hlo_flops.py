"""``hlo_flops``: matmul and convolution FLOPs of lowered programs, loops counted as often as they
run, against FLOPs counted by hand (2 x multiply-adds). XLA's own cost analysis counts a loop body
once (shown here), which is why the compile plan reads the HLO."""
import jax
import jax.numpy as jnp
import pytest

from didr_jax.pipelines.hlo_flops import HloParseError, flops_by_op, program_flops

S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
MM = 2 * 128 * 256 * 256     # one [128, 256] x [256, 256] product


def _conv(x, k, stride=1, groups=1):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def _scan(w, x):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


def _nested(w, x):
  def outer(h, _):   # 7 matmuls (i = 2..8) per outer step, 3 outer steps
    return jax.lax.fori_loop(2, 9, lambda i, h: jnp.tanh(h @ w[i]), h), None
  return jax.lax.scan(outer, x, None, length=3)[0]


def _remat(w, x):
  layer = jax.checkpoint(lambda h: jnp.tanh(h @ w[0]))
  return layer(layer(x))


CASES = {  # name: (function, argument shapes, forward FLOPs by hand, forward + gradient FLOPs by hand)
    "conv 3x3": (_conv, (S(2, 16, 16, 32), S(3, 3, 32, 64)), 2 * (2 * 16 * 16 * 64) * (3 * 3 * 32), None),
    # the input gradient of a stride-2 convolution: a convolution of a 2x2-dilated input
    "conv stride 2, 4 groups": (lambda x, k: _conv(x, k, 2, 4), (S(2, 16, 16, 32), S(3, 3, 8, 64)),
                                2 * (2 * 8 * 8 * 64) * (3 * 3 * 8), None),
    "batched matmul": (lambda a, b: jnp.einsum("bqd,bkd->bqk", a, b), (S(4, 128, 64), S(4, 256, 64)),
                       2 * 4 * 128 * 256 * 64, None),
    "scan of 5 layers": (_scan, (S(5, 256, 256), S(128, 256)), 5 * MM, None),
    "fori_loop from 2 in a scan": (_nested, (S(16, 256, 256), S(128, 256)), 21 * MM, None),
    # rematerialised: the backward pass runs the forward again (2 layers x (1 + 1 + 2))
    "checkpointed layers": (_remat, (S(1, 256, 256), S(128, 256)), 2 * MM, 8 * MM),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flops_equal_a_hand_count(name):
  fn, args, forward, with_grad = CASES[name]
  lowered = jax.jit(fn).lower(*args)
  assert program_flops(lowered.as_text(dialect="hlo")) == pytest.approx(forward, rel=1e-9)
  # forward + the gradients of the input and the weights: 3x the forward's products
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1))).lower(*args)
  assert program_flops(grad.as_text(dialect="hlo")) == pytest.approx(with_grad or 3 * forward, rel=1e-9)


def test_xla_cost_analysis_counts_a_loop_body_once():
  """The reason this counter exists: XLA's figure for a 16-layer scan is that of one layer."""
  lowered = jax.jit(_scan).lower(S(16, 256, 256), S(128, 256))
  assert lowered.compile().cost_analysis()["flops"] < 1.1 * MM
  assert program_flops(lowered.as_text(dialect="hlo")) == 16 * MM


def test_flops_are_attributed_to_the_jax_operation():
  by_op = flops_by_op(jax.jit(_scan).lower(S(5, 256, 256), S(128, 256)).as_text(dialect="hlo"))
  assert sum(by_op.values()) == 5 * MM and all("dot_general" in k for k in by_op), by_op


def test_a_loop_with_a_data_dependent_trip_count_is_refused():
  def until_small(x):
    return jax.lax.while_loop(lambda h: jnp.sum(h) > 1.0, lambda h: 0.5 * (h @ h), x)
  text = jax.jit(until_small).lower(S(64, 64)).as_text(dialect="hlo")
  with pytest.raises(HloParseError, match="trip count"):
    program_flops(text)
