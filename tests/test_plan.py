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
               "xla_cost_flops", "bytes_accessed", "est_step_s", "mfu_ceiling", "compile_s"}


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
  k, n = result["config"]["align"]["k_ta"], result["config"]["train"]["steps_per_chunk"]
  s = result["steps"]
  per_outer = s["generator"]["flops"] + k * s["ta"]["flops"]
  assert k == 2 and s["per_outer_step"]["flops"] == per_outer
  # the chunk runs n outer steps of k TA updates and one generator update: its loops counted
  assert s["outer"]["flops"] == pytest.approx(n * per_outer, rel=0.02)
  # XLA's own cost analysis counts the k-update loop's body once
  once = s["generator"]["xla_cost_flops"] + s["ta"]["xla_cost_flops"]
  assert s["outer"]["xla_cost_flops"] == pytest.approx(once, rel=0.02)
  # the TA update has no loop: its matmul and convolution FLOPs per chip are close to XLA's count
  # of all ops of the chip's program (which leaves out products with convolution padding, most of
  # a 4x4 latent)
  assert 0.8 * s["ta"]["xla_cost_flops"] <= s["ta"]["flops"] <= 1.2 * s["ta"]["xla_cost_flops"]
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
  # its FLOPs come from the lowered program, the same as when it fits
  assert one["flops"] > 0 and one["bytes_accessed"] is None and one["est_step_s"] is None
  assert "NO" in plan.table(result) and "exceeds available HBM" in plan.table(result)


@pytest.mark.long
@pytest.mark.parametrize("config", ["configs/pixart.py:tiny", "configs/zimage.py:tiny"])
def test_dit_runs_compile_for_tpu(config, tmp_path):
  """The DiT backbones' TA and generator updates (DIDR) compile for 4 TPU chips with FSDP."""
  proc = _plan(f"--config={config}", "--topology=v5e:2x2", "--steps=ta,generator", f"--out={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "plan.json") as f:
    result = json.load(f)
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and set(result["steps"]) == {
      "ta", "generator", "per_outer_step"}
  ta, gen = result["steps"]["ta"], result["steps"]["generator"]
  assert ta["fits"] and gen["fits"] and 0 < ta["flops"] < gen["flops"]


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


@pytest.mark.parametrize("backbone, net_params", [
    ("sdxl", 2_567_463_684), ("sd15", 859_520_964),
    # diffusers' counts of the same configs: tests/test_pixart.py and tests/test_zimage.py
    ("pixart", 611_349_152), ("zimage", 6_154_908_736)])
def test_shipped_configs_build_the_published_networks(backbone, net_params):
  """Parameter counts of the full-size network shapes against the released checkpoints' counts
  (the VAE and reward configs are checked against diffusers / transformers in
  tests/test_model_configs.py)."""
  import jax
  import numpy as np
  from didr_jax import sharding
  from didr_jax.pipelines.config import base_config
  from didr_jax.pipelines.plan import abstract_parts
  parts = abstract_parts(base_config(backbone, "run"), sharding.single_device_mesh(),
                         sharding.get_rules("replicated"))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts["ref"])) == net_params


@pytest.mark.parametrize("backbone", ["sdxl", "sd15", "pixart", "zimage"])
def test_plan_conds_are_the_rows_the_run_encodes(backbone):
  """The plan compiles the steps on cond rows it never encodes: their keys, per-prompt shapes and
  dtypes (and the CFG empty-prompt rows) must be those the ``:tiny`` run's encoder produces."""
  import jax
  import numpy as np
  from didr_jax import sharding
  from didr_jax.pipelines.config import base_config
  from didr_jax.pipelines.plan import abstract_parts
  from didr_jax.pipelines.t2i import T2I
  cfg = base_config(backbone, "tiny")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
  pipe = T2I(cfg, devices=jax.devices()[:1])
  rows = pipe.encoder.encode(["a red cube", "a city at night"])
  parts = abstract_parts(cfg, sharding.single_device_mesh(), sharding.get_rules(cfg.mesh.rules))
  assert {k: (v.shape[1:], np.dtype(v.dtype)) for k, v in rows.items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in parts["cond_rows"].items()}
  run_empty, plan_empty = pipe.encoder.empty, parts["empty"]
  if run_empty is None:
    assert plan_empty is None
  else:
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in run_empty.items()} == {
        k: (v.shape, np.dtype(v.dtype)) for k, v in plan_empty.items()}
