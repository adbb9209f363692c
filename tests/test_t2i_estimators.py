"""DIDR's DRS estimators on the tiny SDXL pipeline (1 device, in-process).

The tiny config's snis (table variance) step runs and moves the generator, with the variance table
computed from the initial generator, written to the workdir and read back (not recomputed) on
resume; the real configs' local (JVP) variance runs through the same step. The 8-device
CLI runs of the tiny default are in tests/test_t2i_cli_methods.py.
"""
import os

import chex
import jax
import numpy as np
import pytest

from didr_jax.pipelines.t2i import T2I
from didr_jax.training.drs_table import TableFileError, persisted_variance_table
from tests import t2i_fixtures as tf


_fast_compiles = pytest.fixture(scope="module", autouse=True)(tf.fast_compiles)


@pytest.fixture(scope="module")
def pipe():
  return T2I(tf.tiny_config("didr"), devices=jax.devices()[:1])


def _step(pipe, cfg, frozen):
  parts = tf.experiment.build_training(pipe, cfg)
  state = tf.fresh_state(pipe, cfg)
  cond = jax.tree.map(lambda v: v[0], tf.conds(pipe, 0))
  before = jax.tree.map(np.asarray, state.gen_params)
  state, metrics = jax.jit(parts["gen_update"])(state, frozen, cond)
  moved = max(float(np.max(np.abs(np.asarray(a) - b)))
              for a, b in zip(jax.tree.leaves(state.gen_params), jax.tree.leaves(before)))
  metrics = {k: np.asarray(v) for k, v in metrics.items()}
  assert np.isfinite(metrics["gen_loss"]) and metrics["gen_skipped"] == 0
  assert metrics["drs_grad_norm"] > 0 and moved > 0
  return metrics


def test_tiny_default_snis_with_a_stored_table(pipe, tmp_path):
  cfg = tf.tiny_config("didr")
  assert (cfg.objective.drs, cfg.objective.snis_variance) == ("snis", "table")
  path = str(tmp_path / "drs_table.json")
  table = persisted_variance_table(path, lambda: pipe.variance_table(tf.sampler(cfg)), pipe.mesh)
  v = np.asarray(table["v"])
  assert os.path.exists(path) and v.shape == (64,) and np.all(np.isfinite(v)) and np.all(v >= 0)
  assert v[-1] > v[0]        # more x0 uncertainty at high noise

  def must_not_compute():
    raise AssertionError("a stored table must be read, not recomputed")
  again = persisted_variance_table(path, must_not_compute, pipe.mesh)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, table), jax.tree.map(np.asarray, again))
  metrics = _step(pipe, cfg, dict(pipe.frozen(), drs_table=table))
  assert 1.0 <= float(metrics["snis_ess"]) <= cfg.objective.snis_m
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(TableFileError, match="drs_table.json"):
    persisted_variance_table(path, must_not_compute, pipe.mesh)


def test_local_variance_snis_step(pipe):
  """snis with the real configs' local (JVP through the guided UNet) variance, at K = 1 to keep
  the compile small."""
  cfg = tf.tiny_config("didr")
  cfg.objective.snis_variance, cfg.objective.snis_k = "local", 1
  _step(pipe, cfg, pipe.frozen())
