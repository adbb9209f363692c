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


def pytest_collection_modifyitems(config, items):
  """End-to-end (``slow``) files first: under ``--dist loadfile`` the longest files then start
  at once on separate workers and the quick files fill in behind them, instead of a long file
  starting last and running alone."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
