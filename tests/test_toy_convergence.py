"""Correctness of the toy end to end: DIDR with the exact DRS and with the shipped estimator
(snis) reach p* (|P(x>0) - P*| <= 0.03), with the smooth reward and with the step reward 1[x > 0],
and with the smooth reward also p*'s shape: W1 <= 0.12 and the negative mode where p* has it (a
generator whose map folds spreads that mode over [-3, 0]: std about 0.9 for p*'s 0.5).

Runs `configs/toy.py:fast` (learned reference, distilled generator, 3k alignment steps) through the
CLI for the DIDR rows only. The check is correctness, not a ranking of methods.

The two runs share XLA's persistent compilation cache, and the second starts from the first's
pre-training checkpoints: the reference and the distilled generator depend on neither the reward
nor the methods (their checkpoint identities leave both out), so the second run restores exactly
what it would have trained, and aligns from there.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINING = ("reference", "distill")   # reward-independent phases (didr_jax.toy.experiment.identities)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """XLA's persistent cache of the module's runs, and the workdir of a finished run (once one
  has finished) whose pre-training checkpoints a later run starts from."""
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return {"env": dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"),
          "finished": None}


@pytest.mark.parametrize("reward, p_star_expected", [
    ("sigmoid", 0.8798), pytest.param("step", 0.8808, marks=pytest.mark.long)])
def test_didr_reaches_p_star(tmp_path, shared, reward, p_star_expected):
  workdir = tmp_path / "run"
  if shared["finished"] is not None:
    for phase in PRETRAINING:
      shutil.copytree(os.path.join(shared["finished"], "checkpoints", phase),
                      workdir / "checkpoints" / phase)
  methods = "('didr-exact','didr')" if reward == "sigmoid" else "('didr',)"
  out = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/toy.py:fast",
                        f"--workdir={workdir}", f"--config.methods={methods}",
                        f"--config.toy.reward={reward}"],
                       cwd=ROOT, env=shared["env"], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  if shared["finished"] is not None:   # the copied pre-training was restored, not redone
    assert "compiled reference" not in out.stderr and "compiled distill" not in out.stderr
  shared["finished"] = str(workdir)
  with open(workdir / "results.json") as f:
    results = json.load(f)
  p_star = results["target"]["p_pos"]
  assert abs(p_star - p_star_expected) < 1e-3
  # The initial generator was far from p* (the test is not passing by doing nothing).
  assert results["generator_init"]["p_pos"] < 0.6
  for name, didr in results["methods"].items():
    assert abs(didr["p_pos"] - p_star) <= 0.03, (name, didr["p_pos"], p_star)
    assert didr["off_manifold"] < 0.05, name
    if reward == "sigmoid":
      neg, target_neg = didr["mode_stats"][0], results["target"]["mode_stats"][0]
      assert didr["w1"] <= 0.12, (name, didr["w1"])
      assert abs(neg["mean"] - target_neg["mean"]) <= 0.15, (name, neg, target_neg)
      assert neg["std"] <= target_neg["std"] + 0.2, (name, neg, target_neg)
