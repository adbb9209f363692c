"""Test session setup: CPU only, 8 simulated devices, set before JAX starts any backend."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# CPU only, for this process and every subprocess a test starts (they copy os.environ): with libtpu
# installed (tests/test_plan.py compiles for TPU topologies) JAX would otherwise probe for a TPU,
# and each probing process takes libtpu's machine-wide lock.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_chex_trace_counter():
  import chex
  chex.clear_trace_counter()
  yield


def pytest_configure(config):
  """pytest-xdist (3.6 and later) hands out ``--dist loadfile`` files by their number of tests,
  most first, unless told not to; that order would put the few-test end-to-end files last and
  undo the order below (``--loadscope-reorder`` on the command line is overridden too)."""
  if getattr(config.option, "loadscopereorder", None) is not None:
    config.option.loadscopereorder = False


TIERS = ("suite", "long", "all")


def pytest_addoption(parser):
  parser.addoption("--tier", choices=TIERS, default=None,
                   help="suite: every test but the long end-to-end runs (the default, the CI's "
                        "15-minute budget); long: only those (marker 'long'); all: both. "
                        "Default: suite, or all when test files are named on the command line")


def _select_tier(config, items):
  """Deselect (reported as such, not skipped) the tests outside ``--tier``; a test file named on
  the command line runs whole unless ``--tier`` is given."""
  tier = config.getoption("tier")
  if tier is None:
    named = any(str(a).split("::")[0].endswith(".py") for a in config.args)
    tier = "all" if named else "suite"
  if tier == "all":
    return
  in_tier = [(i.get_closest_marker("long") is not None) == (tier == "long") for i in items]
  keep = [i for i, ok in zip(items, in_tier) if ok]
  dropped = [i for i, ok in zip(items, in_tier) if not ok]
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_collection_modifyitems(config, items):
  """The ``--tier``'s tests. End-to-end (``slow``) files first, the multi-process ones (the
  longest) first among them: under ``--dist loadfile`` the longest files then start at once on
  separate workers and the quick files fill in behind them, instead of a long file starting last
  and running alone."""
  def rank(item):
    if item.get_closest_marker("slow") is None:
      return 2
    return 1 if item.get_closest_marker("multiprocess") is None else 0
  _select_tier(config, items)
  items.sort(key=rank)


PARITY_MODULE_LINE = "\npytestmark = pytest.mark.parity\n"


def pytest_ignore_collect(collection_path, config):
  """Under ``-m "not parity"`` the parity modules (module-level ``pytestmark = pytest.mark.parity``:
  they import PyTorch at import time) are not imported: none of their tests could be selected, and
  a machine without PyTorch collects the rest. Everywhere else a missing PyTorch fails their
  import, as a missing dependency must (no skip)."""
  if "not parity" not in (config.getoption("markexpr") or ""):
    return None
  if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
    if PARITY_MODULE_LINE in collection_path.read_text():
      return True
  return None
