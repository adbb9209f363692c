"""The functional trainer: sharded == 1 device, 2 processes == 1 process, exact resume, NaN guard."""
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.toy_tiny import dump_state, run_alignment, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "toy_worker.py")


def _run(args, timeout=240, env=None):
  proc = subprocess.run([sys.executable, WORKER, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def _assert_states_close(a, b, atol, rtol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=rtol, err_msg=k)


@pytest.fixture(scope="module")
def eight_device_didr():
  return dump_state(run_alignment(tiny_config("didr_drp", 4), "didr_drp"))


@pytest.mark.parametrize("method", ["didr_drp", "distar"])
def test_sharded_step_equals_single_device(method, eight_device_didr):
  assert jax.device_count() == 8
  cfg = tiny_config(method, 4)
  sharded = eight_device_didr if method == "didr_drp" else dump_state(run_alignment(cfg, method))
  single = dump_state(run_alignment(cfg, method, devices=jax.devices()[:1]))
  _assert_states_close(sharded, single, atol=2e-5, rtol=1e-5)
  # The run moved the parameters (the comparison is not between two untouched inits).
  init = dump_state(run_alignment(tiny_config(method, 0), method, devices=jax.devices()[:1]))
  k = next(k for k in single if "gen_params" in k and "kernel" in k)
  assert np.max(np.abs(single[k] - init[k])) > 1e-4


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(tmp_path, eight_device_didr):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / "mp.npz"), "--method=didr_drp",
                             "--steps=4", "--devices=4", f"--rank={r}", "--nproc=2", f"--port={port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for r in range(2)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      p.kill()
      out, _ = p.communicate()
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "worker done 0 8" in outs[0] and "worker done 1 8" in outs[1]
  with np.load(tmp_path / "mp.npz") as f:
    multi = dict(f)
  _assert_states_close(multi, eight_device_didr, atol=1e-6, rtol=1e-6)


def test_resume_in_fresh_process_is_bitwise(tmp_path):
  """N steps + checkpoint, restore in a new process, N more == 2N straight (bitwise on CPU)."""
  ckpt = str(tmp_path / "ckpt")
  _run([str(tmp_path / "a.npz"), "--steps=2", f"--ckpt={ckpt}"])
  _run([str(tmp_path / "b.npz"), "--steps=4", f"--ckpt={ckpt}"])
  _run([str(tmp_path / "straight.npz"), "--steps=4"])
  with np.load(tmp_path / "b.npz") as f1, np.load(tmp_path / "straight.npz") as f2:
    resumed, straight = dict(f1), dict(f2)
  with np.load(tmp_path / "a.npz") as f:
    half = dict(f)
  assert int(half[".step"]) == 2 and int(resumed[".step"]) == 4
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
  k = next(k for k in half if "gen_opt" in k and "mu" in k)
  assert not np.array_equal(half[k], straight[k]), "optimizer state must have moved after step 2"


def test_nan_update_is_skipped_and_counted():
  """A non-finite generator loss leaves params and optimizer untouched and counts bad_steps."""
  from didr_jax.toy import experiment
  from didr_jax.training import state as st
  from didr_jax.training.steps import StepConfig, make_outer_step
  from didr_jax.training.task import Task
  import dataclasses
  cfg = tiny_config("dipp", 1)
  toy = experiment.Toy(cfg)
  bad_task = dataclasses.replace(toy.task, reward_apply=lambda frozen, x0, c: jnp.full(x0.shape[:1], jnp.nan))
  obj = experiment.objective_config(cfg, "dipp")
  gtx, ttx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  outer, _, gen_update = make_outer_step(bad_task, obj, StepConfig(64, 1), gtx, ttx)
  state = st.init_train_state(gen_params=toy.gen_init, ta_params=toy.ref_init, gen_tx=gtx, ta_tx=ttx,
                              ema=False, seed=0, mesh=toy.mesh)
  before = dump_state(state)
  new, metrics = jax.jit(gen_update)(state, {"ref": toy.ref_init}, None)
  after = dump_state(new)
  assert float(metrics["gen_skipped"]) == 1.0 and int(new.bad_steps) == 1 and int(new.step) == 1
  for k in before:
    if "gen_params" in k or "gen_opt" in k:
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  new2, _ = jax.jit(gen_update)(new, {"ref": toy.ref_init}, None)
  assert int(new2.bad_steps) == 2


def test_tree_mode_equals_graph_mode(tmp_path, eight_device_didr):
  env = dict(os.environ, NNX_GRAPH_MODE="false", NNX_GRAPH_UPDATES="false")
  _run([str(tmp_path / "tree.npz"), "--steps=4"], env=env)
  with np.load(tmp_path / "tree.npz") as f:
    tree = dict(f)
  _assert_states_close(tree, eight_device_didr, atol=0.0)
