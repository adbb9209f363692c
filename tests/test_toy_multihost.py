"""Stopping a 2-process run (the toy through ``python -m didr_jax.main --multihost`` under the
stand-in srun of tests/fake_slurm, 1 CPU device per process): SIGTERM reaching one host, or the
hosts at different times, stops both at one step, which both save, and both exit 0; a stop also
keeps the next queued method from starting on any host. Resumed to the end, the run's samples and
metrics equal an uninterrupted 2-process run's bit for bit. (The t2i job's version of this, with
the SDXL models and the SLURM launcher, is tests/test_t2i_cli_multihost.py in the long tier.)
"""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from tests.cli_util import TOY_SMALL, free_port, run_signalling_processes

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRUN = os.path.join(ROOT, "tests", "fake_slurm", "srun")
METHODS = ("di", "dipp")
STEPS = 100   # alignment steps, in chunks of 25


def command(workdir: str) -> list[str]:
  return ["bash", SRUN, sys.executable, "-m", "didr_jax.main", "--config=configs/toy.py:fast",
          f"--workdir={workdir}", "--multihost", *TOY_SMALL, "--config.train.parallel_methods=1",
          "--config.train.steps_per_chunk=25", f"--config.align.steps={STEPS}",
          f"--config.methods={METHODS!r}"]


def run(workdir: str, cache: str, pids, schedule=()) -> tuple[str, list[str]]:
  """Both processes to their exit (0); SIGTERM per ``schedule`` [(marker, rank)]. (log, delivered)."""
  env = dict(os.environ, XLA_FLAGS="", FAKE_SLURM_NTASKS="2", FAKE_SLURM_PID_DIR=str(pids),
             JAX_COORDINATOR_PORT=str(free_port()), JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  pids.mkdir()
  targets = [(marker, lambda r=rank: int((pids / str(r)).read_text())) for marker, rank in schedule]
  code, log, delivered = run_signalling_processes(command(workdir), cwd=ROOT, env=env,
                                                  schedule=targets, timeout=600)
  assert code == 0, log[-4000:]
  return log, delivered


def saved(workdir: str, method: str) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints", method)) if s.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run, and one stopped twice then finished (same command, one workdir):
  1. SIGTERM to host 1 alone while host 0 logs the first method's first chunk;
  2. (resumed) SIGTERM to host 0 during the second method, to host 1 only once host 0 has stopped.
  Checkpoints only at step 100 and at the stops. The stopped run starts from the uninterrupted
  run's pre-training checkpoints (the reference and the distilled generator depend on neither the
  methods nor the stops)."""
  tmp = tmp_path_factory.mktemp("toy_multihost")
  cache = str(tmp / "jax_cache")
  straight, stopped = str(tmp / "straight"), str(tmp / "stopped")
  out = {"straight": run(straight, cache, tmp / "pids_straight")}
  for phase in ("reference", "distill"):
    shutil.copytree(os.path.join(straight, "checkpoints", phase), os.path.join(stopped, "checkpoints", phase))
  schedules = [[(f"[di] step 25/{STEPS}", 1)],
               [(f"[dipp] step 25/{STEPS}", 0), ("stopped by signal", 1)],
               []]
  for i, schedule in enumerate(schedules):
    out[i] = run(stopped, cache, tmp / f"pids{i}", schedule)
    out[i] += ({m: saved(stopped, m) for m in METHODS},)
  return straight, stopped, out


def stop_step(log: str, process: int) -> int:
  found = re.findall(rf"stopped by signal 15 on process {process} at step (\d+); checkpoint saved", log)
  assert len(found) == 1, log[-3000:]
  return int(found[0])


def test_sigterm_to_one_host_stops_both_at_one_saved_step(runs):
  _, _, out = runs
  log, delivered, ckpts = out[0]
  assert delivered == [f"[di] step 25/{STEPS}"], log[-3000:]
  step = stop_step(log, 1)
  assert step < STEPS and ckpts["di"] == [step], ckpts      # one forced save, of both hosts
  assert ckpts["dipp"] == [], "the queued method must not start after the stop"
  assert "compiled align/dipp" not in log and "finished" not in log


def test_sigterm_to_both_hosts_at_different_times_stops_them_together(runs):
  _, _, out = runs
  first = stop_step(out[0][0], 1)
  log, delivered, ckpts = out[1]
  assert delivered == [f"[dipp] step 25/{STEPS}", "stopped by signal"], log[-3000:]
  assert f"[di] step {first + 25}/{STEPS}" in log and f"[di] step {first}/{STEPS}" not in log
  step = stop_step(log, 0)
  assert step < STEPS and ckpts["dipp"] == [step], ckpts


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(runs):
  straight, stopped, out = runs
  log, _, _ = out[2]
  assert "[di] already finished" in log and f"[dipp] step {stop_step(out[1][0], 0) + 25}/{STEPS}" in log
  with np.load(os.path.join(straight, "samples.npz")) as a, np.load(os.path.join(stopped, "samples.npz")) as b:
    assert set(a) == set(b) == {"reference", "generator_init", *METHODS}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  results = []
  for workdir in (straight, stopped):
    with open(os.path.join(workdir, "results.json")) as f:
      r = json.load(f)
    results.append({m: {k: v for k, v in r["methods"][m].items() if k != "wall_s"} for m in METHODS})
  assert results[0] == results[1]
