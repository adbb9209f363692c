"""Test session setup: 8 simulated CPU devices, set before JAX starts any backend."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_chex_trace_counter():
  import chex
  chex.clear_trace_counter()
  yield
