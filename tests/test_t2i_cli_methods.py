"""``python -m didr_jax.main --config=configs/sdxl.py:tiny`` for DI, DI++ and DI* on an 8-device CPU
mesh (DIDR: tests/test_t2i_cli.py), and the sharded run against a 1-device run.

The 1-device run starts from the 8-device DI++ run's step-2 checkpoint, so one comparison proves
both that the checkpoint restores onto a different mesh shape and that a step on 1 device equals
the same step on 8 (FSDP) devices within float32 reduction-order tolerance. The DI run is repeated
as 2 hosts x 4 devices through the SLURM launch script.
"""
import os
import shutil
import sys

import numpy as np
import pytest

from configs.sdxl import get_config
from tests import t2i_cli
from tests.cli_util import free_port

FAKE_SLURM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_slurm")

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


@pytest.mark.multiprocess
@pytest.mark.multiprocess
def test_slurm_launch_two_hosts_equals_one_host(method_runs, cache, tmp_path):
  """launch/gpu_slurm.sbatch under a stand-in srun (2 tasks x 4 CPU devices, SLURM's environment):
  --multihost auto-detects the job, each host feeds its half of the batch, orbax saves
  collectively, the export gathers across hosts; the result equals the 1-host 8-device run up to
  float32 reduction order."""
  single, _ = method_runs("di")
  multi = str(tmp_path / "multi")
  environ = dict(t2i_cli.env(cache, devices=4), PATH=f"{FAKE_SLURM}:{os.environ['PATH']}",
                 FAKE_SLURM_NTASKS="2", JAX_COORDINATOR_PORT=str(free_port()),
                 SLURM_SUBMIT_DIR=t2i_cli.ROOT, PYTHON=sys.executable)
  cmd = ["bash", os.path.join(t2i_cli.ROOT, "launch", "gpu_slurm.sbatch"), *t2i_cli.command(multi, "di")[3:]]
  log = t2i_cli.run(cmd, environ)
  assert "per host 4 (2 hosts), per device 1 (data x fsdp = 8)" in log
  lr = get_config("tiny").align.gen_optimizer.lr
  for name in ("unet", "unet_ema"):
    a, b = t2i_cli.exported(multi, name), t2i_cli.exported(single, name)
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    # Adam normalises a near-zero gradient to a full step, so reduction-order noise may move an
    # element by up to one step (lr) per update; all others agree to float32 round-off
    assert np.mean(diff > 1e-6) < 1e-4 and diff.max() < 3 * lr, (name, np.mean(diff > 1e-6), diff.max())
  ra, rb = t2i_cli.train_rows(multi, "di"), t2i_cli.train_rows(single, "di")
  assert sorted(ra) == [1, 2, 3]
  for step in ra:
    for k in ("di/gen_loss", "di/ta_loss", "di/reward", "di/reward_std"):
      np.testing.assert_allclose(ra[step][k], rb[step][k], rtol=1e-5, atol=1e-6, err_msg=(step, k))
