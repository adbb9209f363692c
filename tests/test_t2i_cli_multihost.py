"""The t2i main job as 2 hosts x 1 CPU device through ``launch/gpu_slurm.sbatch`` under a stand-in
srun (one node, SLURM's environment per task): ``--multihost`` auto-detects the job, each host
encodes and feeds its half of the batch, orbax saves collectively, process 0 writes the metrics,
grid and the export gathered across hosts (DI, 4 steps: a chunk's progress line is written one
chunk late, so a signal sent on step 1's line stops the run at step 2 or 3, before its end).

The 2-host run's step-2 checkpoint then resumes on 1 host with 1 device: one comparison proves that
a checkpoint restores onto another mesh shape and process count, and that a step on 1 device
equals the same step on the 2 hosts' devices up to float32 reduction order. (One device per host:
the multi-host logic is the same with more, and SPMD partitioning over 8 devices more than doubles
the tiny job's compile time; FSDP over 8 devices runs in tests/test_t2i_cli.py.)

SIGTERM reaching the hosts at different times stops them together at one step, which both save: a
run where only host 1 gets it, then a rerun (it resumes) where host 0 gets it during a step and
host 1 only after the stop. Both saved states equal the uninterrupted run's bit for bit.
"""
import os
import re
import shutil
import sys

import numpy as np
import pytest

from tests import t2i_cli
from tests.cli_util import free_port, run_signalling_processes

pytestmark = [pytest.mark.slow, pytest.mark.long, pytest.mark.multiprocess]
FAKE_SLURM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_slurm")
SBATCH = os.path.join(t2i_cli.ROOT, "launch", "gpu_slurm.sbatch")


def slurm_env(cache: str, **extra) -> dict:
  return dict(t2i_cli.env(cache, devices=1), PATH=f"{FAKE_SLURM}:{os.environ['PATH']}",
              FAKE_SLURM_NTASKS="2", JAX_COORDINATOR_PORT=str(free_port()),
              SLURM_SUBMIT_DIR=t2i_cli.ROOT, PYTHON=sys.executable, **extra)


STEPS = 4


def command(workdir: str, *extra: str) -> list[str]:
  return t2i_cli.command(workdir, "di", f"--config.align.steps={STEPS}", *extra)


def sbatch(workdir: str, *extra: str) -> list[str]:
  return ["bash", SBATCH, *command(workdir, *extra)[3:]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("t2i_multihost") / "jax_cache")


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("two_hosts") / "run")
  return workdir, t2i_cli.run(sbatch(workdir), slurm_env(cache))


@pytest.fixture(scope="module")
def stopped_twice(tmp_path_factory, cache, two_hosts):
  """Two runs of the same command in one workdir, each stopped by SIGTERM.

  Checkpoints only at the stops (interval 100), so each saved step is a stop's forced save, which
  orbax writes collectively: a host that went on to the next step instead would leave the other
  waiting in the save, and the run would hang until the timeout kills it.
  Run 1: SIGTERM to host 1 alone once host 0 logs step 1 (host 1 is in the training loop by then,
  so the loop's handler catches it, not JAX's preemption notifier, which does before the loop).
  Run 2 resumes; SIGTERM to host 0 once it starts training, and to host 1 once host 0 has stopped
  (late, as a scheduler's ssh fan-out or per-node signal can be): host 1 must still exit 0.
  Returns (workdir, [(return code, log, delivered markers, saved steps after the run)] per run).
  """
  tmp = tmp_path_factory.mktemp("stopped")
  workdir = str(tmp / "run")
  schedules = ([(f"[di] step 1/{STEPS}", 1)], [("compiled align/di", 0), ("stopped by signal", 1)])
  runs = []
  for i, schedule in enumerate(schedules):
    pids = tmp / f"pids{i}"
    pids.mkdir()
    targets = [(marker, lambda r=rank, d=pids: int((d / str(r)).read_text())) for marker, rank in schedule]
    code, log, delivered = run_signalling_processes(
        sbatch(workdir, "--config.checkpoint.every_steps=100"), cwd=t2i_cli.ROOT,
        env=slurm_env(cache, FAKE_SLURM_PID_DIR=str(pids)), schedule=targets, timeout=600)
    assert code == 0, log[-4000:]
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    runs.append((code, log, delivered, saved))
  return workdir, runs


def test_slurm_two_hosts_run_three_steps_and_export(two_hosts):
  workdir, log = two_hosts
  assert "per host 4 (2 hosts), per device 4 (data x fsdp = 2)" in log
  t2i_cli.assert_complete_run(workdir, "di", keys=("di/reward", "di/reward_std", "di/kl_grad_norm"),
                              steps=STEPS)


@pytest.mark.parity
def test_diffusers_loads_the_two_host_export(two_hosts):
  t2i_cli.assert_diffusers_loads_export(two_hosts[0])


def test_one_device_step_from_two_host_checkpoint_equals_two_host_step(two_hosts, cache, tmp_path):
  multi, _ = two_hosts
  single = str(tmp_path / "single")
  os.makedirs(os.path.join(single, "checkpoints"))
  shutil.copytree(os.path.join(multi, "checkpoints", "2"), os.path.join(single, "checkpoints", "2"))
  log = t2i_cli.run(command(single), t2i_cli.env(cache, devices=1))
  assert "per host 8 (1 hosts), per device 8 (data x fsdp = 1)" in log
  assert f"[di] step {STEPS}/{STEPS}" in log and f"[di] step 2/{STEPS}" not in log   # restored step 2
  err = t2i_cli.max_export_diff(multi, single)
  assert max(err.values()) < 1e-5, err
  ra, rb = t2i_cli.train_rows(multi, "di")[3], t2i_cli.train_rows(single, "di")[3]
  for k in ("di/gen_loss", "di/ta_loss", "di/reward", "di/reward_std", "di/kl_grad_norm"):
    np.testing.assert_allclose(rb[k], ra[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigterm_to_one_host_stops_both_at_the_same_step(stopped_twice):
  _, runs = stopped_twice
  _, log, delivered, saved = runs[0]
  assert delivered == [f"[di] step 1/{STEPS}"], log[-3000:]
  found = re.findall(r"stopped by signal 15 on process 1 at step (\d+); checkpoint saved", log)
  assert len(found) == 1, log[-3000:]
  assert saved == [int(found[0])] and saved[0] < STEPS, saved   # the forced save of both hosts
  assert "finished at step" not in log


def test_sigterm_to_both_hosts_at_different_times_stops_them_together(stopped_twice):
  _, runs = stopped_twice
  first = runs[0][3][0]
  _, log, delivered, saved = runs[1]
  assert delivered == ["compiled align/di", "stopped by signal"], log[-3000:]
  assert f"[di] step {first + 1}/{STEPS}" in log and f"[di] step {first}/{STEPS}" not in log   # resumed
  found = re.findall(r"stopped by signal 15 on process 0 at step (\d+); checkpoint saved", log)
  assert len(found) == 1, log[-3000:]
  assert saved == [first, int(found[0])], saved


def test_stopped_and_resumed_run_equals_uninterrupted_run_bit_for_bit(stopped_twice, two_hosts):
  """Each stop's checkpoint (the whole TrainState: generator, TA, EMA, both optimizers, RNG, step)
  and its metrics equal the uninterrupted run's at the same step, bit for bit."""
  workdir, runs = stopped_twice
  straight, _ = two_hosts
  rows, ref_rows = t2i_cli.train_rows(workdir, "di"), t2i_cli.train_rows(straight, "di")
  for step in runs[1][3]:
    a, b = t2i_cli.checkpoint_arrays(workdir, step), t2i_cli.checkpoint_arrays(straight, step)
    assert set(a) == set(b) and int(a["['step']"]) == step
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step}: {k}")
    assert {k: v for k, v in rows[step].items() if k != "time"} == \
        {k: v for k, v in ref_rows[step].items() if k != "time"}
