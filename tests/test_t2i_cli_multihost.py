"""The t2i main job as 2 hosts x 4 CPU devices through ``launch/gpu_slurm.sbatch`` under a stand-in
srun (one node, SLURM's environment per task): ``--multihost`` auto-detects the job, each host
encodes and feeds its half of the batch, orbax saves collectively, process 0 writes the metrics,
grid and the export gathered across hosts (DI, 3 steps).

The 2-host run's step-2 checkpoint then resumes on 1 host with 1 device: one comparison proves that
a checkpoint restores onto another mesh shape and process count, and that a step on 1 device
equals the same step on 8 devices of 2 hosts up to float32 reduction order.
"""
import os
import shutil
import sys

import numpy as np
import pytest

from tests import t2i_cli
from tests.cli_util import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
FAKE_SLURM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_slurm")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("t2i_multihost") / "jax_cache")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("two_hosts") / "run")
  environ = dict(t2i_cli.env(cache, devices=4), PATH=f"{FAKE_SLURM}:{os.environ['PATH']}",
                 FAKE_SLURM_NTASKS="2", JAX_COORDINATOR_PORT=str(free_port()),
                 SLURM_SUBMIT_DIR=t2i_cli.ROOT, PYTHON=sys.executable)
  cmd = ["bash", os.path.join(t2i_cli.ROOT, "launch", "gpu_slurm.sbatch"), *t2i_cli.command(workdir, "di")[3:]]
  return workdir, t2i_cli.run(cmd, environ)


def test_slurm_two_hosts_run_three_steps_and_export(two_hosts):
  workdir, log = two_hosts
  assert "per host 4 (2 hosts), per device 1 (data x fsdp = 8)" in log
  t2i_cli.assert_complete_run(workdir, "di", keys=("di/reward", "di/reward_std", "di/kl_grad_norm"))


def test_one_device_step_from_two_host_checkpoint_equals_two_host_step(two_hosts, cache, tmp_path):
  multi, _ = two_hosts
  single = str(tmp_path / "single")
  os.makedirs(os.path.join(single, "checkpoints"))
  shutil.copytree(os.path.join(multi, "checkpoints", "2"), os.path.join(single, "checkpoints", "2"))
  log = t2i_cli.run(t2i_cli.command(single, "di"), t2i_cli.env(cache, devices=1))
  assert "per host 8 (1 hosts), per device 8 (data x fsdp = 1)" in log
  assert "[di] step 3/3" in log and "[di] step 2/3" not in log   # restored step 2
  err = t2i_cli.max_export_diff(multi, single)
  assert max(err.values()) < 1e-5, err
  ra, rb = t2i_cli.train_rows(multi, "di")[3], t2i_cli.train_rows(single, "di")[3]
  for k in ("di/gen_loss", "di/ta_loss", "di/reward", "di/reward_std", "di/kl_grad_norm"):
    np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)
