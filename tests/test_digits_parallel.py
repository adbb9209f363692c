"""Digits sweep runs in two threads (train.parallel_runs = 2) equal the same runs one after the
other, bit for bit, on the real (tiny) UNet; runs sharing a program are one job, dearest first."""
import collections
import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# ~70 s: the suite keeps the toy's threads-equal-sequential test (tests/test_toy_parallel.py)
pytestmark = pytest.mark.long


def test_runs_in_two_threads_equal_runs_in_one(tmp_path):
  from configs.digits import get_config
  from didr_jax.digits.experiment import align_runs
  from didr_jax.training.loop import wait_for_jobs
  from didr_jax.digits.phases import Aligner
  from didr_jax.digits.problem import Digits
  from didr_jax.digits.sweep import run_specs
  cfg = get_config("fast")
  with cfg.unlocked():
    cfg.unet.width = 8
    cfg.align.batch = 8
    cfg.align.steps = 3
    cfg.sweep.dipp_scales = (1.0, 10.0)
  specs = [s for s in run_specs(cfg) if s.method in ("di", "dipp")]
  assert [s.name for s in specs] == ["di", "dipp_1", "dipp_10"]
  dg = Digits(cfg, devices=jax.devices()[:1])
  aligner = Aligner(dg, {"ref": dg.unet_init, "clf": dg.clf_init["reward"]})
  warm = aligner.init_state(dg.unet_init, dg.unet_init)
  z = jax.random.normal(jax.random.PRNGKey(5), (10,) + dg.task.sample_shape)
  y = jnp.arange(10) % 10
  generate = jax.jit(lambda p: dg.generate(p, z, y))
  native = lambda x: np.asarray(x)
  out = {}
  for workers in (1, 2):
    workdir = tmp_path / str(workers)
    (workdir / "runs").mkdir(parents=True)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      jobs = align_runs(aligner, specs, warm, collections.defaultdict(lambda: None), None, None,
                        generate, native, str(workdir), pool)
      assert len(jobs) == 2          # {dipp_1, dipp_10} share one program: one job, queued first
      done = wait_for_jobs(jobs, pool)
    assert [list(group) for group in done] == [["dipp_1", "dipp_10"], ["di"]]
    out[workers] = {name: images for group in done for name, (images, _) in group.items()}
  for name in out[1]:
    np.testing.assert_array_equal(out[2][name], out[1][name], err_msg=name)
  assert not np.array_equal(out[1]["dipp_1"], out[1]["dipp_10"]), "the scale must matter"
