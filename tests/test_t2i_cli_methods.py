"""``python -m didr_jax.main --config=configs/sdxl.py:tiny`` for DI, DI++ and DI* on an 8-device CPU
mesh (DIDR: tests/test_t2i_cli.py), and the sharded run against a 1-device run.

The 1-device run starts from the 8-device DI++ run's step-2 checkpoint, so one comparison proves
both that the checkpoint restores onto a different mesh shape and that a step on 1 device equals
the same step on 8 (FSDP) devices within float32 reduction-order tolerance.
"""
import os
import shutil

import numpy as np
import pytest

from tests import t2i_cli

pytestmark = pytest.mark.slow

METHOD_KEYS = {"di": ("di/reward", "di/reward_std", "di/kl_grad_norm"),
               "dipp": ("dipp/reward", "dipp/reward_std", "dipp/kl_grad_norm"),
               "distar": ("distar/reward", "distar/reward_std", "distar/pseudo_huber")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One persistent compilation cache for the module (the eval program is shared by all runs)."""
  return str(tmp_path_factory.mktemp("t2i_methods") / "jax_cache")


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, cache):
  done = {}

  def run(method):
    if method not in done:
      workdir = str(tmp_path_factory.mktemp(method) / "run")
      done[method] = (workdir, t2i_cli.run(t2i_cli.command(workdir, method), t2i_cli.env(cache)))
    return done[method]
  return run


@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_method_runs_three_steps_and_exports(method_runs, method):
  workdir, log = method_runs(method)
  assert "per device 1 (data x fsdp = 8)" in log
  t2i_cli.assert_complete_run(workdir, method, keys=METHOD_KEYS[method])
  rows = t2i_cli.train_rows(workdir, method)
  assert not any(k.startswith(f"{method}/drs_to_kl") for r in rows.values() for k in r), \
      "the DRS ratio is a DIDR metric"


def test_one_device_step_from_8_device_checkpoint_equals_8_device_step(method_runs, cache, tmp_path):
  sharded, _ = method_runs("dipp")
  single = str(tmp_path / "single")
  os.makedirs(os.path.join(single, "checkpoints"))
  shutil.copytree(os.path.join(sharded, "checkpoints", "2"), os.path.join(single, "checkpoints", "2"))
  log = t2i_cli.run(t2i_cli.command(single, "dipp"), t2i_cli.env(cache, devices=1))
  assert "per device 8 (data x fsdp = 1)" in log
  assert "[dipp] step 3/3" in log and "[dipp] step 2/3" not in log   # restored step 2
  for name in ("unet", "unet_ema"):
    a, b = t2i_cli.exported(sharded, name), t2i_cli.exported(single, name)
    err = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert err < 1e-5, (name, err)
  ra, rb = t2i_cli.train_rows(sharded, "dipp")[3], t2i_cli.train_rows(single, "dipp")[3]
  for k in ("dipp/gen_loss", "dipp/ta_loss", "dipp/reward"):
    np.testing.assert_allclose(rb[k], ra[k], rtol=1e-4, atol=1e-5, err_msg=k)

