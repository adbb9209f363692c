"""The digits experiment end to end through the CLI (configs/digits.py:fast): SIGTERM while two
runs train side by side (train.parallel_runs = 2) saves both and exits 0, the rerun resumes them
and writes every output; results.json is
recomputed independently from samples.npz and the classifiers' checkpoints; the reference is
classified far above chance by the held-out classifier; bad input is one line naming the field."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist, pdist

from tests.cli_util import run_until_then_signal

pytestmark = [pytest.mark.slow, pytest.mark.long]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="")   # 1 CPU device, as on a laptop
RUNS = ["reference", "generator_init", "di", "dipp_10", "distar_10", "didr_0.1"]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """The interrupted run and its rerun share XLA's persistent cache."""
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
  ENV["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  yield


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "didr_jax.main", "--config=configs/digits.py:fast",
          f"--workdir={workdir}", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits") / "run")
  returncode, first = run_until_then_signal(_cmd(workdir), cwd=ROOT, env=ENV,
                                             marker="[didr_0.1] step 10/20", timeout=600)
  assert returncode == 0, first[-3000:]
  assert "stopped by signal 15" in first, first[-3000:]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  second = subprocess.run(_cmd(workdir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  return workdir, second.stderr


def test_rerun_resumes_the_interrupted_runs(finished_run):
  """Every run finishes exactly once over the two invocations; the one that was signalled (the
  dearest, queued first) resumes from its saved step."""
  _, second = finished_run
  for phase in ("clf_reward", "clf_heldout", "clf_features", "reference", "distill"):
    assert f"compiled {phase} " not in second, phase       # finished phases are restored, not rerun
  assert "[didr_0.1] step 20/20" in second and "[didr_0.1] step 10/20" not in second
  for name in ("di", "dipp_10", "distar_10"):
    assert (f"[{name}] already finished" in second) != (f"[{name}] step 20/20" in second), name


def _load(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with np.load(os.path.join(workdir, "samples.npz")) as f:
    samples = dict(f)
  return results, samples


def test_outputs_complete_and_consistent(finished_run):
  workdir, _ = finished_run
  for name in ("config.json", "results.json", "results.md", "samples.npz", "pareto.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  results, samples = _load(workdir)
  assert list(results["runs"]) == RUNS
  assert results["default_runs"] == {"di": "di", "dipp": "dipp_10", "distar": "distar_10", "didr": "didr_0.1"}
  assert set(samples) == {f"{r}/{k}" for r in RUNS + ["real_test"] for k in ("images", "labels")}
  n = results["data"]["n_test"]
  for r in RUNS + ["real_test"]:
    images, labels = samples[f"{r}/images"], samples[f"{r}/labels"]
    assert images.shape == (n, 8, 8) and images.dtype == np.float32 and labels.shape == (n,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(labels, samples["real_test/labels"])
    assert os.path.getsize(os.path.join(workdir, "grids", f"{r}.png")) > 0
  for r in RUNS[2:]:
    m = results["runs"][r]
    assert m["wall_s"] > 0 and r in results["pareto"]["dominated_by"]
  assert results["runs"]["didr_0.1"]["trainer_tbins"], "the trainer's per-t-bin DRS metrics"
  table = open(os.path.join(workdir, "results.md")).read()
  assert all(f"| {r} |" in table for r in RUNS)
  with open(os.path.join(workdir, "pareto.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _classifier_outputs(workdir, images, labels):
  """Restore the three classifiers from their checkpoints and evaluate them here (float64 softmax)."""
  import jax
  from flax import nnx
  from configs.digits import get_config
  from didr_jax.digits.experiment import identities
  from didr_jax.digits.problem import Digits
  from didr_jax.training import state as st
  from didr_jax.training.checkpoint import Checkpointer
  cfg = get_config("fast")
  dg = Digits(cfg, devices=jax.devices()[:1])
  ids = identities(cfg)
  out = {}
  for name in ("reward", "heldout", "features"):
    c = cfg.classifiers[name]
    like = st.init_fit_state(params=dg.clf_init[name], tx=st.make_optimizer(c.optimizer), seed=0, mesh=dg.mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", f"clf_{name}"), identity=ids[f"clf_{name}"],
                        max_to_keep=1, save_every=1, async_save=False)
    params = ckpt.restore(like).params
    ckpt.close()
    model = nnx.merge(dg.clf_graph[name], params)
    x = np.asarray(images, np.float32)[..., None]
    if name == "features":
      out[name] = np.asarray(model.features(x), np.float64)
    else:
      logits = np.asarray(model(x), np.float64)
      logp = logits - logits.max(1, keepdims=True)
      logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
      out[name] = (logp[np.arange(len(labels)), labels], logits.argmax(1))
  return out


def _fd(a, b):
  mu1, mu2, c1, c2 = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2) - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)


def _coverage(queries, support, k):
  radii = np.sort(cdist(support, support), axis=1)[:, k]
  return float(np.mean((cdist(queries, support) <= radii).any(axis=1)))


def test_results_recomputed_from_samples(finished_run):
  workdir, _ = finished_run
  results, samples = _load(workdir)
  real_x, real_y = samples["real_test/images"], samples["real_test/labels"]
  real_feat = _classifier_outputs(workdir, real_x, real_y)["features"]
  from didr_jax.digits.data import load_split
  train = load_split(0.3, 0).train_images[..., 0].reshape(-1, 64)
  threshold = np.quantile(cdist(real_x.reshape(-1, 64), train).min(1), 0.99)
  for run in RUNS:
    m = results["runs"][run]
    x, y = samples[f"{run}/images"], samples[f"{run}/labels"]
    out = _classifier_outputs(workdir, x, y)
    feat = out["features"]
    expected = {
        "reward": out["reward"][0].mean(), "heldout_reward": out["heldout"][0].mean(),
        "reward_accuracy": np.mean(out["reward"][1] == y), "heldout_accuracy": np.mean(out["heldout"][1] == y),
        "fd": _fd(feat, real_feat),
        "fd_class_mean": np.mean([_fd(feat[y == c], real_feat[real_y == c]) for c in range(10)]),
        "precision": _coverage(feat, real_feat, 3), "recall": _coverage(real_feat, feat, 3),
        "diversity": np.mean([pdist(feat[y == c]).mean() for c in range(10)]),
        "off_manifold": np.mean(cdist(x.reshape(-1, 64), train).min(1) > threshold)}
    for key, value in expected.items():
      assert m[key] == pytest.approx(float(value), rel=1e-3, abs=1e-4), (run, key)


def test_reference_is_classified_far_above_chance(finished_run):
  workdir, _ = finished_run
  results, _ = _load(workdir)
  ref = results["runs"]["reference"]
  assert ref["heldout_accuracy"] > 0.7, ref       # chance is 0.1; measured 0.898 (configs/digits.py:fast, seed 0)
  assert results["classifiers"]["heldout"]["test_accuracy"] > 0.9


def test_workdir_of_another_config_is_refused(finished_run):
  workdir, _ = finished_run
  out = subprocess.run(_cmd(workdir, "--config.objective.cfg_w=2.0"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]
  assert "different config" in last and "cfg_w" in last, last


@pytest.mark.parametrize("override, field", [
    ("--config.sweep.didr_beta=0.5", "config.sweep.didr_beta"),
    ("--config.sweep.didr_betas=(0.25,-1.0)", "config.sweep.didr_betas"),
    ("--config.classifiers.heldout.kind=cnn", "config.classifiers.heldout.kind"),
    ("--config.sweep.didr_estimators=('exact',)", "config.sweep.didr_estimators"),
])
def test_bad_input_one_line_naming_the_field(tmp_path, override, field):
  out = subprocess.run(_cmd(str(tmp_path / "w"), override), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: {field}"), lines[-3:]
  assert not os.path.exists(tmp_path / "w" / "checkpoints"), "nothing may be trained or written"
