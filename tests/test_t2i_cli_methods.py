"""``python -m didr_jax.main --config=configs/sdxl.py:tiny`` for DI++ and DI* on 1 CPU device (the
8-device FSDP run: DIDR in tests/test_t2i_cli.py; DI as 2 hosts: tests/test_t2i_cli_multihost.py;
SPMD partitioning more than doubles the tiny job's compile time). The DI* run starts with one TA
warm-up step."""
import numpy as np
import pytest

from tests import t2i_cli

pytestmark = [pytest.mark.slow, pytest.mark.long]

METHOD_KEYS = {"dipp": ("dipp/reward", "dipp/reward_std", "dipp/kl_grad_norm"),
               "distar": ("distar/reward", "distar/reward_std", "distar/pseudo_huber")}
# DI++ with a reward weight that dominates its KL term, evaluated after every step: the held-out
# reward of the fixed eval prompts and seeds must rise (a flipped reward sign lowers it)
EXTRA = {"distar": ("--config.align.ta_warmup_steps=1", "--config.objective.weighting=plain"),
         "dipp": ("--config.objective.alpha_rew=1000", "--config.eval.every_chunks=1")}
WARMUP = {"distar": 1}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("t2i_methods") / "jax_cache")   # the eval program is shared
  done = {}

  def run(method):
    if method not in done:
      workdir = str(tmp_path_factory.mktemp(method) / "run")
      cmd = t2i_cli.command(workdir, method, *EXTRA.get(method, ()))
      done[method] = (workdir, t2i_cli.run(cmd, t2i_cli.env(cache, devices=1)))
    return done[method]
  return run


@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_method_runs_three_steps_and_exports(method_runs, method):
  workdir, log = method_runs(method)
  assert "per device 8 (data x fsdp = 1)" in log
  t2i_cli.assert_complete_run(workdir, method, keys=METHOD_KEYS[method], warmup=WARMUP.get(method, 0))
  rows = t2i_cli.train_rows(workdir, method)
  assert not any(k.startswith(f"{method}/drs_to_kl") for r in rows.values() for k in r), \
      "the DRS ratio is a DIDR metric"


def test_dipp_raises_the_evaluated_reward_every_step(method_runs):
  """The eval reward (the reward model applied to decoded images of fixed prompts and seeds, not
  the trainer's reward path) rises at every step of a reward-dominated DI++ run; with the reward's
  sign flipped in the objective or in the task it falls."""
  workdir, _ = method_runs("dipp")
  evals = {r["step"]: r["eval/reward_mean"] for r in t2i_cli.metrics(workdir) if "eval/reward_mean" in r}
  assert sorted(evals) == [1, 2, 3], evals
  assert evals[1] < evals[2] < evals[3], evals


@pytest.mark.parity
@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_diffusers_loads_the_exports(method_runs, method):
  t2i_cli.assert_diffusers_loads_export(method_runs(method)[0])


def test_ta_warmup_trains_the_ta_and_leaves_the_generator(method_runs, tmp_path):
  """align.ta_warmup_steps=1: step 1 logs TA metrics only, and its checkpoint still holds the
  initial generator (generator == its EMA, which only generator steps move); step 2 moves both."""
  from didr_jax.pipelines.export_checkpoint import export_checkpoint
  workdir, log = method_runs("distar")
  assert "TA warm-up: steps 1..1 run 2 TA updates each, the generator is frozen" in log
  first = [r for r in t2i_cli.metrics(workdir) if r["step"] == 1 and "distar/ta_loss" in r]
  assert first and not any("distar/gen_loss" in r for r in first)
  for step, same in ((1, True), (2, False)):
    unet, ema = export_checkpoint(workdir, step=step, output=str(tmp_path / str(step)))
    a, b = t2i_cli.read_unet(unet), t2i_cli.read_unet(ema)
    assert all(np.array_equal(a[k], b[k]) for k in a) == same, step
