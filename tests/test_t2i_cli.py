"""``python -m didr_jax.main --config=configs/sdxl.py:tiny`` with DIDR on a 2-device CPU mesh (FSDP:
parameters and batch split in two; the 8-way mesh runs in-process in tests/test_t2i_pipeline.py).

One run is stopped by SIGTERM after step 1 (it saves and exits 0) and rerun to the end; it must
equal an uninterrupted run bit for bit (optimizer state, RNG and data position included). In the
long tier a run SIGKILLed during step 2 (a crash: no half-written checkpoint may be picked up) and
rerun must equal it too. The reruns share the first run's persistent compilation cache. The
generator of any saved step exports on demand.
"""
import os
import signal

import numpy as np
import pytest

from tests import t2i_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("t2i_didr")
  environ = t2i_cli.env(str(tmp / "jax_cache"), devices=2)
  resumed, straight = str(tmp / "resumed"), str(tmp / "straight")
  logs = {}
  code, logs["sigterm"] = t2i_cli.run_then_signal(t2i_cli.command(resumed, "didr"), environ,
                                                  "[didr] step 1/3", signal.SIGTERM)
  assert code == 0, logs["sigterm"][-4000:]
  logs["exports_after_sigterm"] = os.path.isdir(os.path.join(resumed, "export"))
  logs["resumed"] = t2i_cli.run(t2i_cli.command(resumed, "didr"), environ)
  logs["straight"] = t2i_cli.run(t2i_cli.command(straight, "didr"), environ)
  return resumed, straight, logs, environ


def test_sigterm_saves_and_exits_zero_then_reruns_resume(runs):
  resumed, _, logs, _ = runs
  assert "per device 4 (data x fsdp = 2)" in logs["sigterm"]
  assert "stopped by signal 15 at step 1; checkpoint saved" in logs["sigterm"]
  assert not logs["exports_after_sigterm"], "a preempted run exports nothing"
  assert "[didr] step 3/3" in logs["resumed"] and "[didr] step 1/3" not in logs["resumed"]


def test_outputs_metrics_grid_checkpoint_and_export(runs):
  _, straight, logs, _ = runs
  t2i_cli.assert_complete_run(straight, "didr", keys=("didr/reward", "didr/reward_std",
                                                      "didr/snis_ess", "didr/drs_grad_norm"))
  rows = t2i_cli.metrics(straight)
  for r in t2i_cli.train_rows(straight, "didr").values():   # DRS-to-KL gradient ratio per t-bin
    ratios = {k: v for k, v in r.items() if k.startswith("didr/drs_to_kl/t")}
    assert ratios and all(np.isfinite(v) and v > 0 for v in ratios.values()), r
  perf = [r for r in rows if "perf/step_time_s" in r]
  assert perf and all(r["perf/images_per_s"] > 0 for r in perf)
  assert "compiled align/didr" in logs["straight"] and "ETA" in logs["straight"]


@pytest.mark.parity
def test_diffusers_loads_the_export(runs):
  _, straight, _, _ = runs
  t2i_cli.assert_diffusers_loads_export(straight)


def test_resume_after_sigterm_equals_uninterrupted_run(runs):
  resumed, straight, _, _ = runs
  t2i_cli.assert_runs_equal(resumed, straight, "didr")


@pytest.mark.long
def test_rerun_after_a_kill_in_step_2_equals_uninterrupted_run(runs, tmp_path):
  _, straight, _, environ = runs
  killed = str(tmp_path / "killed")
  code, log = t2i_cli.run_then_signal(t2i_cli.command(killed, "didr"), environ, "[didr] step 2/3",
                                      signal.SIGKILL)
  assert code == -signal.SIGKILL, log[-4000:]
  log = t2i_cli.run(t2i_cli.command(killed, "didr"), environ)
  assert "[didr] step 3/3" in log and "[didr] step 1/3" not in log
  t2i_cli.assert_runs_equal(killed, straight, "didr")


def test_export_on_demand_from_a_checkpoint(runs, tmp_path):
  """``python -m didr_jax.export --workdir`` rebuilds only the generator from a saved step: step 3
  equals the run's final export bit for bit; a missing step or workdir is a named error."""
  from didr_jax.errors import ConfigError
  from didr_jax.pipelines.export_checkpoint import export_checkpoint
  from didr_jax.training.checkpoint import CheckpointNotFoundError
  _, straight, _, _ = runs
  out = str(tmp_path / "on_demand")
  t2i_cli.export_on_demand(straight, out, 3)
  for name in ("unet", "unet_ema"):
    a = t2i_cli.read_unet(os.path.join(out, name))
    b = t2i_cli.exported(straight, name)
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")
  folders = export_checkpoint(straight, step=2)          # default output: <workdir>/export_step2
  assert folders == [os.path.join(straight, "export_step2", n) for n in ("unet", "unet_ema")]
  step2 = t2i_cli.read_unet(folders[0])
  assert not np.array_equal(step2["conv_in.weight"], t2i_cli.exported(straight)["conv_in.weight"])
  with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint of step 7; it has \[1, 2, 3\]"):
    export_checkpoint(straight, step=7)
  with pytest.raises(ConfigError, match=r"config.json: .*nowhere/config.json not found"):
    export_checkpoint(str(tmp_path / "nowhere"))
