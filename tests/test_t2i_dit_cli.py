"""``python -m didr_jax.main --config=configs/{pixart,zimage}.py:tiny`` with DIDR: one run is stopped
by SIGTERM after step 1 (it saves and exits 0) and rerun to the end; it must equal an uninterrupted
run bit for bit. The exported ``transformer`` loads in diffusers and reproduces our network's
output; the on-demand export of a checkpoint names it the same way (these runs: long tier, the
suite's 15 minutes hold the SDXL one; the backbones' numerics are in tests/test_backbones.py and
their real loaders in tests/test_t2i_dit_real.py). Bad inputs exit 2 with one line. Other methods
and estimators: tests/test_t2i_dit_cli_methods.py, long tier.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import t2i_cli

pytestmark = pytest.mark.slow

CONFIGS = {"pixart": "configs/pixart.py:tiny", "zimage": "configs/zimage.py:tiny"}
DEVICES = 8


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runs(request, tmp_path_factory):
  name = request.param
  tmp = tmp_path_factory.mktemp(f"dit_{name}")
  environ = t2i_cli.env(str(tmp / "jax_cache"), devices=DEVICES)
  resumed, straight = str(tmp / "resumed"), str(tmp / "straight")
  cmd = lambda w: t2i_cli.command(w, "didr", config=CONFIGS[name])
  code, log = t2i_cli.run_then_signal(cmd(resumed), environ, "[didr] step 1/3", signal.SIGTERM)
  assert code == 0, log[-4000:]
  assert "stopped by signal 15 at step 1" in log
  t2i_cli.run(cmd(resumed), environ)
  t2i_cli.run(cmd(straight), environ)
  return name, resumed, straight


@pytest.mark.long
def test_resume_after_sigterm_equals_uninterrupted_run(runs):
  name, resumed, straight = runs
  names = ("transformer", "transformer_ema")
  t2i_cli.assert_complete_run(straight, "didr", names=names)
  t2i_cli.assert_runs_equal(resumed, straight, "didr", names=names)
  assert max(t2i_cli.train_rows(resumed, "didr")) == 3, name


@pytest.mark.long
@pytest.mark.parity
def test_diffusers_loads_the_export_and_it_computes_our_network(runs):
  """diffusers' class of the backbone loads export/transformer; on the same inputs it returns what
  our network (rebuilt from the same file) returns."""
  import jax
  from tests.clip_torch_env import torch
  from didr_jax.models.diffusers_loading import from_diffusers
  name, _, straight = runs
  folder = os.path.join(straight, "export", "transformer")
  ours = from_diffusers(folder)
  rng = np.random.default_rng(0)
  c = ours.config
  if name == "pixart":
    from diffusers import PixArtTransformer2DModel as Theirs
    x = rng.standard_normal((2, 4, 4, c.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, c.caption_channels)).astype(np.float32)
    res, ar = np.full((2, 2), 16.0, np.float32), np.ones((2, 1), np.float32)
    got = np.asarray(jax.jit(lambda m, x, ctx: m(x, np.float32(500), ctx, None,
                                                 {"resolution": res, "aspect_ratio": ar}))(ours, x, ctx))
    with torch.no_grad():
      want = Theirs.from_pretrained(folder).eval()(
          torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(ctx),
          timestep=torch.full((2,), 500.0), added_cond_kwargs={
              "resolution": torch.from_numpy(res), "aspect_ratio": torch.from_numpy(ar)}).sample
    want = want.permute(0, 2, 3, 1).numpy()
  else:
    from diffusers import ZImageTransformer2DModel as Theirs
    x = rng.standard_normal((2, 4, 4, c.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, c.cap_feat_dim)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    got = np.asarray(jax.jit(lambda m, x, ctx: m(x, t, ctx))(ours, x, ctx))
    with torch.no_grad():
      out = Theirs.from_pretrained(folder).eval()(
          [torch.from_numpy(xi.transpose(2, 0, 1).copy())[:, None] for xi in x], torch.from_numpy(t),
          [torch.from_numpy(ci) for ci in ctx], return_dict=False)[0]
    want = torch.stack([o[:, 0] for o in out]).permute(0, 2, 3, 1).numpy()
  err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  assert err < 1e-4, err


@pytest.mark.long
def test_export_on_demand_names_the_transformer(runs, tmp_path):
  name, _, straight = runs
  out = str(tmp_path / "on_demand")
  t2i_cli.export_on_demand(straight, out, 3)
  assert sorted(os.listdir(out)) == ["transformer", "transformer_ema"]
  a, b = t2i_cli.read_unet(os.path.join(out, "transformer")), t2i_cli.exported(straight, "transformer")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")


@pytest.mark.parametrize("name, override, field", [
    ("zimage", "--config.model.label_t=999", "model.label_t"),
    ("zimage", "--config.model.time_shift=0", "model.time_shift"),
    ("zimage", "--config.align.gen_t_range=(0.0,0.5)", "align.gen_t_range"),
    ("pixart", "--config.align.ta_t_range=(0,1000)", "align.ta_t_range"),
])
def test_bad_input_exits_2_with_one_named_line(name, override, field, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "didr_jax.main", f"--config={CONFIGS[name]}",
                         f"--workdir={tmp_path / 'run'}", override], cwd=t2i_cli.ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if "config." in l]
  assert len(lines) == 1 and lines[0].startswith(f"error: config.{field}:"), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
