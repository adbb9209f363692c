"""The functional trainer: sharded == 1 device, 2 processes == 1 process, exact resume, NaN guard."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.cli_util import free_port
from tests.toy_tiny import dump_state, run_alignment, tiny_config


def toy_steps(toy, cfg, method, step_cfg, task=None, ema=False):
  """(AlignSteps, fresh TrainState) of the toy with the config's optimizers; ``task`` replaces the
  toy's (a wrapped network or reward)."""
  from didr_jax.toy import experiment
  from didr_jax.training import state as st
  from didr_jax.training.steps import make_outer_step
  gtx, ttx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  steps = make_outer_step(task or toy.task, experiment.objective_config(cfg, method), step_cfg, gtx, ttx)
  state = st.init_train_state(gen_params=toy.gen_init, ta_params=toy.ref_init, gen_tx=gtx, ta_tx=ttx,
                              ema=ema, seed=0, mesh=toy.mesh)
  return steps, state

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
  """4 uninterrupted didr-drp steps on 8 devices (``toy_worker.py OUT --steps=4`` in this process)."""
  return dump_state(run_alignment(tiny_config("didr-drp", 4), "didr-drp"))


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
  """Environment of the 1-process workers: XLA's persistent compilation cache shared by them
  (a program another worker compiled is loaded, not recompiled; every program is kept)."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.mark.parametrize("method", ["didr-drp", "distar"])
def test_sharded_step_equals_single_device(method, eight_device_didr):
  assert jax.device_count() == 8
  cfg = tiny_config(method, 4)
  sharded = eight_device_didr if method == "didr-drp" else dump_state(run_alignment(cfg, method))
  single = dump_state(run_alignment(cfg, method, devices=jax.devices()[:1]))
  _assert_states_close(sharded, single, atol=2e-5, rtol=1e-5)
  # The run moved the parameters (the comparison is not between two untouched inits).
  init = dump_state(run_alignment(tiny_config(method, 0), method, devices=jax.devices()[:1]))
  moved = max(np.max(np.abs(single[k] - init[k])) for k in single if "gen_params" in k)
  assert moved > 1e-4


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(tmp_path, eight_device_didr):
  port = free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / "mp.npz"), "--method=didr-drp",
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


def test_resume_in_fresh_process_is_bitwise(tmp_path, eight_device_didr, worker_env):
  """N steps + checkpoint, restore in a new process, N more == 2N straight (bitwise on CPU; the
  straight run is the same config's, ``eight_device_didr``)."""
  ckpt = str(tmp_path / "ckpt")
  _run([str(tmp_path / "a.npz"), "--steps=2", f"--ckpt={ckpt}"], env=worker_env)
  _run([str(tmp_path / "b.npz"), "--steps=4", f"--ckpt={ckpt}"], env=worker_env)
  straight = eight_device_didr
  with np.load(tmp_path / "b.npz") as f1:
    resumed = dict(f1)
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
  from didr_jax.training.steps import StepConfig
  import dataclasses
  cfg = tiny_config("dipp", 1)
  toy = experiment.Toy(cfg)
  bad_task = dataclasses.replace(toy.task, reward_apply=lambda frozen, x0, c: jnp.full(x0.shape[:1], jnp.nan))
  steps, state = toy_steps(toy, cfg, "dipp", StepConfig(64, 1), task=bad_task)
  gen_update = steps.gen_update
  before = dump_state(state)
  new, metrics = jax.jit(gen_update)(state, {"ref": toy.ref_init}, None)
  after = dump_state(new)
  assert float(metrics["gen_skipped"]) == 1.0 and int(new.bad_steps) == 1 and int(new.step) == 1
  for k in before:
    if "gen_params" in k or "gen_opt" in k:
      np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  new2, _ = jax.jit(gen_update)(new, {"ref": toy.ref_init}, None)
  assert int(new2.bad_steps) == 2


def test_ta_warmup_step_is_k_ta_updates_with_the_generator_frozen():
  """A TA warm-up step == k_ta TA updates in a row (bitwise), leaves the generator, its optimizer
  and EMA untouched, and advances the data position."""
  from didr_jax.toy import experiment
  from didr_jax.training.steps import StepConfig
  cfg = tiny_config("didr-drp", 1)
  toy = experiment.Toy(cfg)
  steps, state = toy_steps(toy, cfg, "didr-drp", StepConfig(64, 2, ema_decay=0.9), ema=True)
  frozen = {"ref": toy.ref_init}
  before = dump_state(state)
  warm, metrics = jax.jit(steps.ta_warmup)(state, frozen, None)
  assert "ta_loss" in metrics and "gen_loss" not in metrics and int(warm.step) == 1
  ta_update = jax.jit(steps.ta_update)
  twice = ta_update(ta_update(state, frozen, None)[0], frozen, None)[0]
  after, expected = dump_state(warm), dump_state(twice)
  field = lambda k: k.lstrip(".")
  for k in before:
    if field(k).startswith(("gen_", "bad_steps")):
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    elif field(k).startswith(("ta_", "rng")):
      np.testing.assert_array_equal(after[k], expected[k], err_msg=k)
  assert sum(field(k).startswith("gen_ema") for k in before) > 0
  assert any(not np.array_equal(after[k], before[k]) for k in before if field(k).startswith("ta_params"))


def test_tree_mode_equals_graph_mode(tmp_path, eight_device_didr, worker_env):
  env = dict(worker_env, NNX_GRAPH_MODE="false", NNX_GRAPH_UPDATES="false")
  _run([str(tmp_path / "tree.npz"), "--steps=4"], env=env)
  with np.load(tmp_path / "tree.npz") as f:
    tree = dict(f)
  _assert_states_close(tree, eight_device_didr, atol=0.0)


@pytest.mark.parametrize("method", ["didr-drp", "dipp"])
def test_gradient_accumulation_equals_full_batch(method):
  """grad_accum=4 on the 8-device mesh (4 microbatches of 16) gives the full batch's TA and generator
  updates (SGD, so the parameter change is the gradient) and the same t-binned ratio sums."""
  import optax
  from didr_jax.toy import experiment
  from didr_jax.training import state as st
  from didr_jax.training.metrics import reduce_chunk_metrics
  from didr_jax.training.steps import StepConfig, make_outer_step
  cfg = tiny_config(method, 1)
  toy = experiment.Toy(cfg)
  obj = experiment.objective_config(cfg, method)
  tx = optax.sgd(0.1)
  out = {}
  for n in (1, 4):
    outer = make_outer_step(toy.task, obj, StepConfig(64, 1, grad_accum=n), tx, tx,
                            batch_sharding=toy.batch_sh).outer
    state = st.init_train_state(gen_params=toy.gen_init, ta_params=toy.ref_init, gen_tx=tx, ta_tx=tx,
                                ema=False, seed=0, mesh=toy.mesh)
    new, metrics = jax.jit(outer)(state, {"ref": toy.ref_init}, None)
    out[n] = (dump_state(new), jax.tree.map(np.asarray, metrics))
  (full, m_full), (acc, m_acc) = out[1], out[4]
  init = dump_state(state)
  for k in full:
    if "gen_params" in k or "ta_params" in k:
      np.testing.assert_allclose(acc[k] - init[k], full[k] - init[k], atol=2e-6, rtol=1e-4, err_msg=k)
  moved = max(float(np.max(np.abs(full[k] - init[k]))) for k in full if "gen_params" in k)
  assert moved > 1e-4
  np.testing.assert_allclose(m_acc["gen_loss"], m_full["gen_loss"], rtol=1e-4, atol=1e-6)
  for k in m_full:
    if k.startswith("ratio:"):        # microbatch means of the sums: 1/4 of the full batch's sums
      np.testing.assert_allclose(4 * m_acc[k], m_full[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert any("/t" in k for k in m_full if k.startswith("ratio:")) == (method == "didr-drp")
  host_full, host_acc = (reduce_chunk_metrics(jax.tree.map(jnp.asarray, m)) for m in (m_full, m_acc))
  for k in ("reward", "reward_std"):   # the batch's mean and std, not means of microbatch stds
    np.testing.assert_allclose(host_acc[k], host_full[k], rtol=1e-4, err_msg=k)
  with pytest.raises(ValueError, match="align.grad_accum=3"):
    StepConfig(64, 1, grad_accum=3)


class FakeSyncPoint:
  """JAX's preemption sync protocol on one process (xla/tsl preemption_sync_manager.cc): the notice,
  here after ``notice_after`` calls, sets the sync point to the last counter passed + 1, and only a
  call with exactly that counter returns True."""

  def __init__(self, notice_after: int):
    self.notice_after, self.point, self.calls = notice_after, None, []

  def __call__(self, counter):
    if self.point is None and len(self.calls) == self.notice_after:
      self.point = (self.calls[-1] if self.calls else 0) + 1
    self.calls.append(counter)
    return counter == self.point


def _fit_state(step: int):
  from didr_jax.training.state import FitState
  return FitState(step=jnp.full((), step, jnp.int32), params={"w": jnp.ones(3)}, opt=(),
                  rng=jax.random.PRNGKey(0))


def _doubling_run(tmp_path, *, start: int, stop=None):
  """run_chunks of a state that doubles ``w`` per step, chunks of 2 steps from ``start`` to 12,
  checkpoints only when forced; returns the Checkpointer."""
  from didr_jax.training.checkpoint import Checkpointer
  from didr_jax.training.loop import run_chunks
  state = _fit_state(start)
  chunk = lambda s, frozen, conds: (s.replace(step=s.step + 2, params={"w": s.params["w"] * 4}), {})
  ck = Checkpointer(str(tmp_path / "ck"), identity={"t": 1}, max_to_keep=2, save_every=100)
  run_chunks(name="p", state=state, frozen=None, chunk=chunk, steps_per_chunk=2, num_steps=12,
             conds_for=lambda s: None, checkpointer=ck, writer=None, stop=stop)
  return ck


def test_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
  """JAX's preemption sync point is met although chunks advance the step by 2 and the run resumed
  at step 4: the loop counts its calls (one per chunk) instead of passing steps, and orbax does
  not ask on its own. The run saves the step it reached and stops."""
  from jax.experimental import multihost_utils
  from didr_jax.training.checkpoint import PREEMPTION, Checkpointer
  from didr_jax.training.loop import Preempted
  sync = FakeSyncPoint(notice_after=2)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", sync)
  first = PREEMPTION.calls + 1
  with pytest.raises(Preempted, match="stopped by a preemption notice at step 10; checkpoint saved"):
    _doubling_run(tmp_path, start=4)
  assert sync.calls == [first, first + 1, first + 2]      # steps 6, 8, 10: once per chunk
  ck = Checkpointer(str(tmp_path / "ck"), identity={"t": 1}, max_to_keep=2, save_every=100)
  assert ck.manager.all_steps() == [10]
  np.testing.assert_array_equal(ck.restore(_fit_state(0)).params["w"], np.full(3, 64.0))
  ck.close()


def test_stop_is_decided_from_every_process_vote(tmp_path, monkeypatch):
  """A SIGTERM caught by another process stops this one at the same chunk (the votes are gathered
  across processes; here another process's vote is added to this one's), with a forced save."""
  from didr_jax.training import loop
  from didr_jax.training.loop import Preempted, StopSignal, stop_reason
  monkeypatch.setattr(loop, "gather_votes", lambda local: np.stack([local, np.array([15, 0], np.int32)]))
  with StopSignal() as stop, pytest.raises(
      Preempted, match="stopped by signal 15 on process 1 at step 2; checkpoint saved"):
    _doubling_run(tmp_path, start=0, stop=stop)
  assert stop.signum is None
  votes = lambda *rows: np.array(rows, np.int32)
  assert stop_reason(votes([0, 0])) is None and stop_reason(votes([0, 0], [0, 0])) is None
  assert stop_reason(votes([15, 0])) == "signal 15"
  assert stop_reason(votes([0, 0], [0, 1])) == "a preemption notice"
  assert stop_reason(votes([2, 0], [15, 1])) == "signal 2 on processes 0, 1"


@pytest.mark.multiprocess
def test_preemption_notice_to_one_process_stops_both_at_the_same_step(tmp_path):
  """2 processes: rank 1 alone gets SIGTERM, which JAX's notifier turns into a preemption notice
  (no StopSignal here); both meet the sync point at the same chunk, save it and stop."""
  port, ckpt = free_port(), str(tmp_path / "ckpt")
  procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / "x.npz"), "--method=di", "--steps=8",
                             "--devices=2", f"--rank={r}", "--nproc=2", f"--port={port}",
                             f"--ckpt={ckpt}", "--sigterm_rank=1"],
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
  steps = []
  for r, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    found = re.findall(rf"worker preempted {r} \[di\] stopped by a preemption notice at step (\d+)", out)
    assert len(found) == 1, out[-3000:]
    steps.append(int(found[0]))
  assert steps[0] == steps[1] < 8, steps
  assert max(int(s) for s in os.listdir(ckpt) if s.isdigit()) == steps[0]


def test_metrics_are_read_one_chunk_late():
  """run_chunks asks conds_for(next step) right after dispatching a chunk and reads a chunk's
  metrics only after the next chunk is dispatched (the host work overlaps the running chunk); the
  last chunk's are read at the end; it asks each step once, and never a step past the end."""
  import flax.struct
  from didr_jax.training.loop import run_chunks
  events = []

  class Metrics(dict):
    def items(self):
      events.append(("read", len([e for e in events if e[0] == "chunk"])))
      return super().items()

  def chunk(state, frozen, conds):
    events.append(("chunk", conds))
    return state.replace(step=state.step + 2), Metrics(loss=jnp.zeros((2,)))

  class Writer:
    def write(self, *a, **k):
      pass

  @flax.struct.dataclass
  class State:
    step: jax.Array

  run_chunks(name="t", state=State(step=jnp.zeros((), jnp.int32)), frozen=None, chunk=chunk,
             steps_per_chunk=2, num_steps=6, conds_for=lambda s: events.append(("conds", s)) or s,
             writer=Writer())
  assert events == [("conds", 0), ("chunk", 0), ("conds", 2), ("chunk", 2), ("conds", 4), ("read", 2),
                    ("chunk", 4), ("read", 3), ("read", 3)], events


def test_a_chunk_is_settled_before_it_is_saved(tmp_path):
  """A chunk that is saved (the save interval, the end) has its metrics read first, so
  ``on_settled`` can refuse the state before it reaches a checkpoint: here it raises at step 4
  (a save step) and the checkpoint keeps step 2."""
  import flax.struct
  from didr_jax.training.checkpoint import Checkpointer
  from didr_jax.training.loop import run_chunks
  events = []

  @flax.struct.dataclass
  class State:
    step: jax.Array

  def chunk(state, frozen, conds):
    events.append(("chunk", int(state.step)))
    return state.replace(step=state.step + 1), {"bad": jnp.asarray([float(int(state.step) + 1 >= 4)])}

  def on_settled(step, metrics, host):
    events.append(("settled", step))
    if float(metrics["bad"][0]):
      raise FloatingPointError(f"refused at {step}")

  ck = Checkpointer(str(tmp_path / "ck"), identity={"t": 1}, max_to_keep=3, save_every=2, async_save=False)
  with pytest.raises(FloatingPointError, match="refused at 4"):
    run_chunks(name="s", state=State(step=jnp.zeros((), jnp.int32)), frozen=None, chunk=chunk,
               steps_per_chunk=1, num_steps=8, conds_for=lambda s: None, checkpointer=ck, writer=None,
               on_settled=on_settled)
  ck.close()
  assert events == [("chunk", 0), ("chunk", 1), ("settled", 1), ("settled", 2), ("chunk", 2),
                    ("chunk", 3), ("settled", 3), ("settled", 4)], events
  assert Checkpointer(str(tmp_path / "ck"), identity={"t": 1}, max_to_keep=3,
                      save_every=2).manager.all_steps() == [2]


@pytest.mark.parametrize("fresh", [True, False])
def test_each_ta_update_gets_its_own_conds(fresh):
  """StepConfig(fresh_ta_conds=True): the 2 TA updates of an outer step train on the conds of
  cond["ta"][0] and cond["ta"][1], the generator update on cond["gen"] (a runtime callback records
  the cond every generator call sees); False: all three use the step's one cond."""
  import dataclasses
  from didr_jax.toy import experiment
  from didr_jax.training.steps import StepConfig
  cfg = tiny_config("di", 1)
  toy = experiment.Toy(cfg)
  seen = []

  def generator_apply(p, z, c):
    jax.debug.callback(lambda m: seen.append(float(m)), jnp.mean(c))
    return toy.task.generator_apply(p, z, None)

  task = dataclasses.replace(toy.task, generator_apply=generator_apply)
  steps, state = toy_steps(toy, cfg, "di", StepConfig(64, 2, fresh_ta_conds=fresh), task=task)
  outer = steps.outer
  full = lambda v: jnp.full((64,), v, jnp.float32)
  cond = {"gen": full(5.0), "ta": jnp.stack([full(1.0), full(2.0)])} if fresh else full(5.0)
  jax.block_until_ready(jax.jit(outer)(state, {"ref": toy.ref_init}, cond))
  jax.effects_barrier()
  assert sorted(seen) == ([1.0, 2.0, 5.0] if fresh else [5.0, 5.0, 5.0]), seen


def test_reward_metrics_every_n_steps_runs_the_reward_on_each_nth_step_only():
  """StepConfig(reward_metrics_every=3) over a 6-step scanned chunk of DI: the reward runs on
  steps 3 and 6 only (a runtime callback records the step), and the chunk's reported reward is
  the mean of those two batches' rewards."""
  import dataclasses
  from didr_jax.toy import experiment
  from didr_jax.training.metrics import reduce_chunk_metrics
  from didr_jax.training.steps import StepConfig, scan_chunk
  cfg = tiny_config("di", 1)
  toy = experiment.Toy(cfg)
  seen = []

  def reward(frozen, x0, c):
    r = toy.problem.reward(x0)
    jax.debug.callback(lambda m: seen.append(float(m)), jnp.mean(r))
    return r

  task = dataclasses.replace(toy.task, reward_apply=reward)
  steps, state = toy_steps(toy, cfg, "di", StepConfig(64, 1, reward_metrics_every=3), task=task)
  outer = steps.outer
  state, metrics = jax.jit(scan_chunk(outer, 6))(state, {"ref": toy.ref_init}, None)
  jax.effects_barrier()
  assert int(state.step) == 6 and len(seen) == 2, seen
  np.testing.assert_allclose(reduce_chunk_metrics(metrics)["reward"], np.mean(seen), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(metrics["ratio:reward"])[:, 1], [0, 0, 64, 0, 0, 64])
  with pytest.raises(ValueError, match="reward_metrics_every"):
    StepConfig(64, 1, reward_metrics_every=0)


def test_stop_reaches_threaded_jobs_when_a_worker_thread_gets_the_signal():
  """A process-directed SIGTERM may land on any thread (XLA's, a job's); the stop flag is set only
  when the main thread runs the Python handler, so ``wait_for_jobs`` must not block the main thread
  until the jobs end: here they stop after ~0.2 s instead of running their 10 s."""
  import concurrent.futures
  import signal
  import threading
  import time
  from didr_jax.training.loop import Preempted, StopSignal, wait_for_jobs
  idents, started = [], threading.Barrier(3)

  def job():
    idents.append(threading.get_ident())
    started.wait()
    for _ in range(200):            # 200 "chunks" of 50 ms, the stop flag read between them
      if stop.requested:
        raise Preempted("stopped")
      time.sleep(0.05)
    return "finished"

  t0 = time.time()
  with StopSignal() as stop, concurrent.futures.ThreadPoolExecutor(2) as pool:
    jobs = [pool.submit(job) for _ in range(2)]
    started.wait()
    signal.pthread_kill(idents[0], signal.SIGTERM)   # to a worker thread, not the main one
    with pytest.raises(Preempted):
      wait_for_jobs(jobs, pool)
  assert time.time() - t0 < 5.0
  assert stop.signum == signal.SIGTERM


def test_closing_all_closes_every_checkpointer_on_a_stop(tmp_path):
  from didr_jax.training.checkpoint import Checkpointer, closing_all
  from didr_jax.training.loop import Preempted
  ckpts = [Checkpointer(str(tmp_path / n), identity={"n": n}, max_to_keep=1, save_every=1,
                        async_save=True) for n in ("a", "b")]
  state = {"x": np.arange(4.0)}
  with pytest.raises(Preempted), closing_all(ckpts):
    ckpts[1].save(1, state, force=True)      # an async save in flight when the other stops
    raise Preempted("stopped")
  assert all(c._closed for c in ckpts)
  assert os.listdir(tmp_path / "b") == ["1"], os.listdir(tmp_path / "b")   # complete, no tmp folder
  ckpts[0].close()                           # a second close does nothing


def test_checkpointers_in_threads_save_at_once(tmp_path):
  """The toy runs its methods in threads, each with its own async checkpointer. Orbax keys a save's
  folder-creation signals by a process-wide operation id, so saves started at once used to collide
  (FileExistsError on ``<step>.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp``, the toy's
  rerun failure on a loaded host). Four threads x 8 saves, then four restores at once."""
  import threading
  import jax
  from didr_jax.training.checkpoint import Checkpointer
  names, errors = ("a", "b", "c", "d"), []
  ckpts = {n: Checkpointer(str(tmp_path / n), identity={"n": n}, max_to_keep=2, save_every=1,
                           async_save=True) for n in names}

  def in_thread(fn):
    def run(n):
      try:
        fn(n)
      except Exception as e:   # reported below, with the checkpointer's name
        errors.append(f"{n}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert not errors, errors

  def save_eight(n):
    for step in range(1, 9):
      ckpts[n].save(step, {"x": np.full((64, 64), 10.0 * step + names.index(n), np.float32)})
    ckpts[n].close()
  in_thread(save_eight)
  assert {n: sorted(os.listdir(tmp_path / n)) for n in names} == {n: ["7", "8"] for n in names}
  like = {"x": jax.numpy.zeros((64, 64), np.float32)}
  restored = {}
  in_thread(lambda n: restored.update({n: Checkpointer(
      str(tmp_path / n), identity={"n": n}, max_to_keep=2, save_every=1).restore(like)}))
  for i, n in enumerate(names):
    np.testing.assert_array_equal(restored[n]["x"], np.full((64, 64), 80.0 + i, np.float32))
