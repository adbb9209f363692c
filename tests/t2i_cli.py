"""Helpers of the t2i CLI tests: run ``python -m didr_jax.main --config=configs/sdxl.py:tiny`` in a
subprocess on N simulated CPU devices, and read back what a run wrote."""
import json
import os
import subprocess
import sys

import numpy as np

from tests.cli_util import run_until_then_signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900


def env(cache_dir: str, devices: int = 8) -> dict:
  """Subprocess environment: N CPU devices, a persistent compilation cache shared by the runs of
  one test module (reruns of the same program skip XLA), unoptimised XLA (tiny shapes)."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def command(workdir: str, method: str, *extra: str, config: str = "configs/sdxl.py:tiny") -> list[str]:
  return [sys.executable, "-m", "didr_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.method={method}", *extra]


def run(cmd, environ) -> str:
  """Run to completion; returns stderr (the log)."""
  proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def run_then_signal(cmd, environ, marker: str, signum: int) -> tuple[int, str]:
  """Send ``signum`` at the first log line containing ``marker``; (return code, log)."""
  return run_until_then_signal(cmd, cwd=ROOT, env=environ, marker=marker, timeout=TIMEOUT,
                               signum=signum)


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_rows(workdir: str, method: str) -> dict[int, dict]:
  """{step: row} of the training metrics (later rows of a resumed step win)."""
  return {r["step"]: r for r in metrics(workdir) if f"{method}/gen_loss" in r}


def read_unet(folder: str) -> dict[str, np.ndarray]:
  from didr_jax.weights import read_safetensors
  return read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def exported(workdir: str, name: str = "unet") -> dict[str, np.ndarray]:
  return read_unet(os.path.join(workdir, "export", name))


def assert_complete_run(workdir: str, method: str, keys=(), warmup: int = 0, steps: int = 3,
                        names=("unet", "unet_ema")):
  """Generator steps warmup+1..steps logged with finite losses (and ``keys``), a held-out eval, the
  last step's grid PNG and checkpoint, and generator + EMA exports."""
  rows = train_rows(workdir, method)
  assert sorted(rows) == list(range(warmup + 1, steps + 1)), sorted(rows)
  for r in rows.values():
    for k in (f"{method}/gen_loss", f"{method}/ta_loss", f"{method}/gen_grad_norm", *keys):
      assert k in r and np.isfinite(r[k]), (k, r)
  evals = {prefix: {r["step"]: r[f"{prefix}/reward_mean"] for r in metrics(workdir)
                    if f"{prefix}/reward_mean" in r} for prefix in ("eval", "eval_ema")}
  assert evals["eval"] and set(evals["eval_ema"]) == set(evals["eval"]), evals   # the EMA too
  assert all(np.isfinite(v) for e in evals.values() for v in e.values()), evals
  for grid in (f"grid_{steps:06d}.png", f"grid_ema_{steps:06d}.png"):
    assert os.path.isfile(os.path.join(workdir, grid)), grid
  assert str(steps) in os.listdir(os.path.join(workdir, "checkpoints"))
  for name in names:
    assert exported(workdir, name), name


def assert_diffusers_loads_export(workdir: str):
  """diffusers loads the generator + EMA exports with the same tensors (imports torch: parity)."""
  from tests import clip_torch_env  # noqa: F401  (torchvision workaround before diffusers)
  from diffusers import UNet2DConditionModel
  for name in ("unet", "unet_ema"):
    model = UNet2DConditionModel.from_pretrained(os.path.join(workdir, "export", name))
    assert model.config.addition_embed_type == "text_time"
    ours = exported(workdir, name)
    sd = model.state_dict()
    assert set(sd) == set(ours)
    np.testing.assert_array_equal(sd["conv_in.weight"].numpy(), ours["conv_in.weight"])


def assert_runs_equal(workdir_a: str, workdir_b: str, method: str, names=("unet", "unet_ema")):
  """Two runs' exports equal bit for bit, and their last training rows (but the time) too."""
  for name in names:
    a, b = exported(workdir_a, name), exported(workdir_b, name)
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}/{k}")
  rows_a, rows_b = train_rows(workdir_a, method), train_rows(workdir_b, method)
  last = max(rows_b)
  assert ({k: v for k, v in rows_a[last].items() if k != "time"} ==
          {k: v for k, v in rows_b[last].items() if k != "time"})


def export_on_demand(workdir: str, out: str, step: int):
  """``python -m didr_jax.export --workdir --step --output`` run to completion."""
  proc = subprocess.run([sys.executable, "-m", "didr_jax.export", f"--workdir={workdir}",
                         f"--step={step}", f"--output={out}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def checkpoint_arrays(workdir: str, step: int) -> dict[str, np.ndarray]:
  """{path: host array} of the whole TrainState a run saved at ``step`` (read without shardings)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  reader = ocp.PyTreeCheckpointer()
  tree = reader.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def max_export_diff(workdir_a: str, workdir_b: str) -> dict[str, float]:
  """{unet, unet_ema: max |a - b|} over every tensor of two runs' exports."""
  out = {}
  for name in ("unet", "unet_ema"):
    a, b = exported(workdir_a, name), exported(workdir_b, name)
    assert set(a) == set(b)
    out[name] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  return out
