"""didr_jax: Diff-Instruct with Diffused Reward (and DI, DI++, DI*) in JAX."""
import os as _os

# XLA:CPU's concurrency-optimised scheduler lets the simulated devices of one host enter a
# program's collectives in different orders; with few cores they then wait for each other forever
# (the Z-Image train step on 2 and 8 CPU devices of a 2-core host, docs/models.md). Read when the
# backend starts, so set on import; it changes CPU compilation only.
_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_CPU_FLAG}".strip()
