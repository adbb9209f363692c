"""``python -m didr_jax.plan``: the ``:tiny`` DIDR run compiled for TPU topologies that are not
attached (libtpu's deviceless AOT compilation, ``JAX_PLATFORMS=cpu``): plan.json holds every
field, FSDP over 4 chips holds about a quarter of the 1-chip arguments per chip, and bad input is
one line naming the flag or field. The shipped full-size configs build the published models."""
import json
import os
import subprocess
import sys

import pytest

# the TPU compiles of the tiny DIDR programs (ta, generator, outer: ~30 + 50 + 100 s on 2 cores)
# are the long tier's; the checks before any compile are the suite's
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
STEP_FIELDS = {"argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "fits", "flops",
               "bytes_accessed", "est_step_s", "mfu_ceiling", "compile_s"}


def _plan(*args):
  return subprocess.run([sys.executable, "-m", "didr_jax.plan", *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def four_chips(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("plan"))
  proc = _plan("--config=configs/sdxl.py:tiny", "--topology=v5e:2x2", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "plan.json")) as f:
    return json.load(f), proc.stdout


@pytest.mark.long
def test_plan_json_has_every_field(four_chips):
  result, printed = four_chips
  assert result["topology"] == "v5e:2x2" and result["num_devices"] == 4
  assert result["device_kind"] == "TPU v5 lite" and result["hbm_bytes"] == 16 * 2 ** 30
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert {"ta", "generator", "outer"} <= set(result["steps"])
  for name in ("ta", "generator", "outer"):
    e = result["steps"][name]
    assert STEP_FIELDS <= set(e), (name, STEP_FIELDS - set(e))
    assert e["fits"] is True and e["flops"] > 0 and e["bytes_accessed"] > 0 and e["temp_bytes"] >= 0
    assert 0 < e["mfu_ceiling"] <= 1
    assert e["total_bytes"] == e["argument_bytes"] + e["output_bytes"] - e["alias_bytes"] + e["temp_bytes"]
    assert e["est_step_s"] == pytest.approx(max(e["flops"] / 197e12, e["bytes_accessed"] / 819e9))
  k = result["config"]["align"]["k_ta"]
  s = result["steps"]
  assert k == 2 and s["outer"]["flops"] == pytest.approx(s["generator"]["flops"] + k * s["ta"]["flops"])
  # why per outer step is generator + k x ta: XLA's cost analysis of the scanned chunk counts the
  # k_ta-update loop's body once (one generator update + one TA update)
  once = s["generator"]["flops"] + s["ta"]["flops"]
  assert s["outer"]["flops_per_iteration"] == pytest.approx(once, rel=0.02)
  # the generator update runs the TA's forward and the reward on top of the same UNet passes
  assert s["generator"]["flops"] > s["ta"]["flops"]
  assert "outer" in printed and "fits" in printed


@pytest.mark.long
def test_fsdp_over_four_chips_holds_a_quarter_of_the_arguments(four_chips):
  from configs.sdxl import get_config
  from didr_jax.pipelines.plan import plan
  one = plan(get_config("tiny"), "v5e:1x1", steps=("ta",), log=lambda _: None)["steps"]["ta"]
  four = four_chips[0]["steps"]["ta"]
  assert one["oom"] is None and four["oom"] is None
  quarter = one["argument_bytes"] / 4
  assert quarter <= four["argument_bytes"] <= 1.2 * quarter, (four["argument_bytes"], quarter)


@pytest.mark.long
def test_a_step_that_does_not_fit_is_reported_with_xla_figure(monkeypatch):
  """On a chip whose HBM (here 40 MiB) cannot hold the 1-chip TA step XLA refuses to compile it;
  the plan reports fits = False, XLA's message and its temporaries figure, no FLOPs."""
  import dataclasses
  from configs.sdxl import get_config
  from didr_jax.pipelines import plan
  monkeypatch.setitem(plan.CHIPS, "v5e", dataclasses.replace(plan.CHIPS["v5e"], hbm_bytes=40 * 2 ** 20))
  result = plan.plan(get_config("tiny"), "v5e:1x1", steps=("ta",), log=lambda _: None)
  one = result["steps"]["ta"]
  assert one["fits"] is False and "exceeds available HBM (40.00M)" in one["oom"], one
  need = plan.OOM_TEMPORARIES.search(one["oom"])
  assert one["temp_bytes"] == int(float(need.group(1)) * 2 ** 20) and one["total_bytes"] > 40 * 2 ** 20
  assert one["flops"] is None and one["est_step_s"] is None
  assert "NO" in plan.table(result) and "exceeds available HBM" in plan.table(result)


@pytest.mark.parametrize("args, starts", [
    (["--topology=v5q:2x2"], "error: --topology='v5q:2x2': expected <chip>:<AxB[xC]>"),
    (["--topology=v5e:3x3"], "error: --topology=v5e:3x3: libtpu refused it"),
    (["--topology=v5e:2x2", "--config.mesh.shape=(3,-1,1)"], "error: config.mesh.shape: "),
    (["--topology=v5e:2x2", "--config.align.batch=6"], "error: config.align.batch: 6 is not divisible"),
    (["--topology=v5e:2x2", "--steps=ta,backward"], "error: --steps=ta,backward: choose from"),
])
def test_bad_input_is_one_line(args, starts):
  proc = _plan("--config=configs/sdxl.py:tiny", *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(starts), last
  assert "compiled" not in proc.stderr


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
  import importlib.util
  from didr_jax.pipelines import plan
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(plan.PlanError, match=r"needs libtpu; install it with pip install 'jax\[tpu\]==0\.10\.2'"):
    plan.topology_devices("v5p:2x2x1")


@pytest.mark.parametrize("backbone, unet_params", [("sdxl", 2_567_463_684), ("sd15", 859_520_964)])
def test_shipped_configs_build_the_published_unets(backbone, unet_params):
  """Parameter counts of the full-size UNet shapes against the released checkpoints' counts
  (the VAE and reward configs are checked against diffusers / transformers in
  tests/test_model_configs.py)."""
  import jax
  import numpy as np
  from configs.sdxl import get_config
  from didr_jax import sharding
  from didr_jax.pipelines.plan import abstract_parts
  cfg = get_config()
  with cfg.unlocked():
    cfg.backbone = backbone
  parts = abstract_parts(cfg, sharding.single_device_mesh(), sharding.get_rules("replicated"))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts["ref"])) == unet_params
