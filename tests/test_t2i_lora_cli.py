"""LoRA through the trainer's CLI: ``python -m didr_jax.main --config=configs/sdxl.py:tiny
--config.model.lora.rank=4`` (DIDR, generator and TA adapted) on 8 CPU devices (long tier). A run
stopped by SIGTERM after step 1 and rerun equals an uninterrupted one bit for bit; the checkpoint
holds only the adapters and their optimizer state, smaller than a full fine-tuning checkpoint by
the ratio of network to adapter bytes; the exported ``unet_lora`` loaded by diffusers' LoRA loader
onto the exported ``unet_base`` reproduces the exported merged ``unet``; the on-demand export
writes the same folders, and ``python -m didr_jax.sample --workdir`` (base + restored adapters)
draws the images the merged export draws. A bad LoRA setting exits 2 with one line before anything
is built (suite; every field: tests/test_validate_fields.py).
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from didr_jax.weights import read_safetensors
from tests import t2i_cli

pytestmark = pytest.mark.slow

DEVICES = 8
LORA = ("--config.model.lora.rank=4", "--config.model.lora.alpha=8.0")
NAMES = ("unet", "unet_ema")


def _size(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(folder) for f in names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("lora")
  environ = t2i_cli.env(str(tmp / "jax_cache"), devices=DEVICES)
  resumed, straight, full = str(tmp / "resumed"), str(tmp / "straight"), str(tmp / "full")
  code, log = t2i_cli.run_then_signal(t2i_cli.command(resumed, "didr", *LORA), environ,
                                      "[didr] step 1/3", signal.SIGTERM)
  assert code == 0, log[-4000:]
  assert "stopped by signal 15 at step 1" in log
  t2i_cli.run(t2i_cli.command(resumed, "didr", *LORA), environ)
  t2i_cli.run(t2i_cli.command(straight, "didr", *LORA), environ)
  t2i_cli.run(t2i_cli.command(full, "didr", "--config.align.steps=1"), environ)   # its checkpoint size
  return resumed, straight, full


@pytest.mark.long
def test_resume_after_sigterm_equals_uninterrupted_run(runs):
  resumed, straight, _ = runs
  t2i_cli.assert_complete_run(straight, "didr", names=NAMES)
  t2i_cli.assert_runs_equal(resumed, straight, "didr", names=NAMES + ("unet_base",))
  for name in NAMES:
    a, b = (read_safetensors(os.path.join(w, "export", f"{name}_lora", "pytorch_lora_weights.safetensors"))
            for w in (resumed, straight))
    assert set(a) == set(b) and a
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.long
def test_checkpoint_holds_only_the_adapters(runs):
  """Every trainable leaf of the checkpoint is an adapter factor; the checkpoint's arrays are the
  7 adapter copies (generator, TA, 2 x 2 Adam moments, EMA), and on disk it is smaller than the
  full fine-tuning checkpoint of the same model by the ratio of network to adapter bytes."""
  _, straight, full = runs
  arrays = t2i_cli.checkpoint_arrays(straight, 3)
  trees = ("gen_params", "ta_params", "gen_ema")
  trainable = {k: v for k, v in arrays.items() if k.startswith(tuple(f"['{t}']" for t in trees))}
  assert trainable and all(k.endswith(("['a']", "['b']")) for k in trainable), sorted(trainable)[:5]
  adapter_bytes = sum(v.nbytes for k, v in arrays.items() if k.startswith("['gen_params']"))
  unet_bytes = sum(v.nbytes for v in t2i_cli.exported(straight, "unet_base").values())
  lora_total = sum(v.nbytes for v in arrays.values())
  assert 7 * adapter_bytes <= lora_total <= 7 * adapter_bytes + 4096, (lora_total, adapter_bytes)
  full_total = sum(v.nbytes for v in t2i_cli.checkpoint_arrays(full, 1).values())
  assert 7 * unet_bytes <= full_total <= 7 * unet_bytes + 4096, (full_total, unet_bytes)
  want = unet_bytes / adapter_bytes
  assert want > 10 and full_total / lora_total >= 0.99 * want, (full_total / lora_total, want)
  # on disk orbax adds per-leaf metadata (sharding specs, tree structure): ~1.3 MB for these 565
  # leaves, the size of the adapters themselves at this tiny width; the files still shrink
  on_disk = _size(os.path.join(full, "checkpoints", "1")) / _size(os.path.join(straight, "checkpoints", "3"))
  assert on_disk > 5, (on_disk, want)


@pytest.mark.long
@pytest.mark.parity
def test_diffusers_lora_loader_reproduces_the_merged_export(runs):
  """diffusers: UNet from export/unet_base + load_lora_adapter(export/unet_lora) == export/unet
  (the merged generator) on the same inputs; the adapters moved it away from the base."""
  from tests.clip_torch_env import torch
  from tests import torch_refs as R
  from diffusers import UNet2DConditionModel as TorchUNet
  _, straight, _ = runs
  export = os.path.join(straight, "export")
  rng = np.random.default_rng(0)
  inputs = dict(sample=rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
                timestep=np.array([10.0, 700.0], np.float32),
                encoder_hidden_states=rng.standard_normal((2, 8, 48)).astype(np.float32),
                text_embeds=rng.standard_normal((2, 32)).astype(np.float32),
                time_ids=np.tile(np.array([[16.0, 16, 0, 0, 16, 16]], np.float32), (2, 1)))
  with torch.no_grad():
    merged = R.torch_unet_call(TorchUNet.from_pretrained(os.path.join(export, "unet")).eval(), inputs)
    base_model = TorchUNet.from_pretrained(os.path.join(export, "unet_base")).eval()
    base = R.torch_unet_call(base_model, inputs)
    base_model.load_lora_adapter(os.path.join(export, "unet_lora"), prefix="unet",
                                 weight_name="pytorch_lora_weights.safetensors")
    adapted = R.torch_unet_call(base_model, inputs)
  assert R.rel_err(adapted, merged) <= 1e-4, R.rel_err(adapted, merged)
  assert R.rel_err(base, merged) > 1e-4, "the adapters must have moved the generator"


@pytest.mark.long
def test_export_on_demand_writes_the_same_folders(runs, tmp_path):
  _, straight, _ = runs
  out = str(tmp_path / "on_demand")
  t2i_cli.export_on_demand(straight, out, 3)
  names = ["unet", "unet_base", "unet_ema", "unet_ema_lora", "unet_lora"]
  assert sorted(os.listdir(out)) == names
  for name in names:
    a, b = (read_safetensors(next(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                                  if f.endswith(".safetensors")))
            for root in (os.path.join(out, name), os.path.join(straight, "export", name)))
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")


@pytest.mark.long
def test_sampling_the_lora_run_equals_sampling_its_merged_export(runs, tmp_path):
  from PIL import Image
  _, straight, _ = runs
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red cube\nan old map\n")
  outs = {}
  for name, args in (("export", ["--config=configs/sdxl.py:tiny", f"--generator={straight}/export/unet"]),
                     ("checkpoint", [f"--workdir={straight}", "--step=3"])):
    outs[name] = str(tmp_path / name)
    proc = subprocess.run([sys.executable, "-m", "didr_jax.sample", *args, f"--prompts={prompts}",
                           f"--out={outs[name]}", "--seeds=0,7", "--batch=2"], cwd=t2i_cli.ROOT,
                          env=t2i_cli.env(str(tmp_path / "cache"), devices=2), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  pngs = sorted(n for n in os.listdir(outs["checkpoint"]) if n.endswith(".png"))
  assert len(pngs) == 4
  for name in pngs:
    np.testing.assert_array_equal(*(np.asarray(Image.open(os.path.join(outs[k], name)))
                                    for k in ("export", "checkpoint")), err_msg=name)


def test_bad_lora_target_exits_2_with_one_named_line(tmp_path):
  """Through the CLI once (each field in-process: tests/test_validate_fields.py)."""
  proc = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/sdxl.py:tiny",
                         f"--workdir={tmp_path / 'run'}", "--config.model.lora.rank=4",
                         "--config.model.lora.targets=('to_q','attn9.nowhere')"], cwd=t2i_cli.ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if "config." in l]
  assert len(lines) == 1 and lines[0].startswith("error: config.model.lora.targets: ['attn9.nowhere']"), \
      proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
