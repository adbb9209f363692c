"""XLA:CPU runs backward convolutions inside a while loop (lax.scan) on a slow path.

  PYTHONPATH=. python benchmarks/digits_scan.py

Times a 3x3 convolution (batch 128, 8x8, 32 -> 32 channels) forward, weight-gradient and
input-gradient: in a plain jit, inside a 4-step ``lax.scan``, and inside a fully unrolled scan.
XLA:CPU's convolution canonicalisation only rewrites the entry computation, so the transposed
convolutions of the backward pass left in a loop body are not sent to the fast kernels (the
optimised HLO keeps ``dim_labels=f01b_i01o->01bf``). This is why ``didr_jax/digits/stepping.py``
unrolls its chunks; the trainer's own ``lax.scan``s (``scan_chunk``, the k_ta TA updates, the
DRP's K steps) hit it for every convolutional backbone on CPU.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402


def timed(fn, *args, reps: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / reps


def looped(fn, n: int, unroll):
  def run(p, x):
    def body(c, _):
      return c + 1e-3, fn(p, x + c)
    return jax.lax.scan(body, 0.0, None, length=n, unroll=unroll)[1]
  return run


def main():
  x = jax.random.normal(jax.random.PRNGKey(0), (128, 8, 8, 32))
  graph, params = nnx.split(nnx.Conv(32, 32, (3, 3), padding=1, rngs=nnx.Rngs(0)))
  loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x) ** 2)
  n = 4
  print("| op | plain jit ms | in lax.scan ms/iter | unrolled scan ms/iter |")
  print("|---|---|---|---|")
  for name, fn in (("forward", loss), ("weight gradient", jax.grad(loss)),
                   ("input gradient", jax.grad(loss, argnums=1))):
    plain = timed(jax.jit(fn), params, x)
    scanned = timed(jax.jit(looped(fn, n, 1)), params, x) / n
    unrolled = timed(jax.jit(looped(fn, n, True)), params, x) / n
    print(f"| {name} | {1e3 * plain:.2f} | {1e3 * scanned:.2f} | {1e3 * unrolled:.2f} |", flush=True)


if __name__ == "__main__":
  record = LoadRecord()
  main()
  record.done()
