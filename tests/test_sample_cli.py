"""``python -m didr_jax.sample`` on a ``:tiny`` run: the files equal the one-step generator computed
here from the restored networks by hand (seed rule, eps -> x0 read-out at label_t, VAE decode,
uint8 rounding, the prompt of each file); the same files on 1 device, on 8, and from 2 processes;
resumable (only missing files are sampled); the index lists every image; the diffusers export
samples what its checkpoint does; bad input is one line and exit code 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.long]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube", "a cat in the snow", "an old map"]
SEEDS = [0, 7]


def env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_DISABLE_MOST_OPTIMIZATIONS="1")


def sample(*args, devices: int = 1) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "didr_jax.sample", *args], cwd=ROOT, env=env(devices),
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step DI run of the tiny SDXL models (checkpoints at steps 1 and 2, with an EMA)."""
  tmp = tmp_path_factory.mktemp("sample")
  workdir = str(tmp / "run")
  out = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/sdxl.py:tiny",
                        f"--workdir={workdir}", "--config.method=di", "--config.align.steps=2",
                        "--config.checkpoint.every_steps=1", "--config.eval.every_chunks=100"],
                       cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  prompts = tmp / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  return workdir, str(prompts), tmp


@pytest.fixture(scope="module")
def sampled(run):
  workdir, prompts, tmp = run
  outs = {}
  for devices, batch in ((1, 2), (8, 8)):
    out = str(tmp / f"out{devices}")
    proc = sample(f"--workdir={workdir}", "--step=1", f"--prompts={prompts}", f"--out={out}",
                  f"--seeds={','.join(map(str, SEEDS))}", f"--batch={batch}", devices=devices)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs[devices] = out
  return outs


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path))


def test_index_lists_every_image(sampled):
  rows = [json.loads(line) for line in open(os.path.join(sampled[1], "index.jsonl"))]
  expected = [(i, s) for i in range(len(PROMPTS)) for s in SEEDS]
  assert [(r["prompt_index"], r["seed"]) for r in rows] == expected
  for r in rows:
    assert r["prompt"] == PROMPTS[r["prompt_index"]] and r["step"] == 1
    assert r["file"] == f"{r['prompt_index']:05d}_{r['seed']}.png"
    assert r["model"].endswith("/checkpoints/1/gen_params")
    assert _png(os.path.join(sampled[1], r["file"])).shape == (16, 16, 3)


def test_same_files_on_one_and_eight_devices(sampled):
  names = sorted(n for n in os.listdir(sampled[1]) if n.endswith(".png"))
  assert len(names) == len(PROMPTS) * len(SEEDS)
  for n in names:
    np.testing.assert_array_equal(_png(os.path.join(sampled[1], n)), _png(os.path.join(sampled[8], n)), n)


def test_images_equal_the_generator_computed_by_hand(run, sampled):
  """x0 = (x - s eps) / a with x = input_scale z, z ~ N(fold_in(PRNGKey(seed), i)), eps the restored
  step-1 generator at label_t with the prompt's conds, a^2 from the scaled_linear betas (numpy)."""
  import jax
  from flax import nnx
  from didr_jax.pipelines import sampling
  from didr_jax.pipelines.export_checkpoint import run_config
  workdir, _, _ = run
  cfg = run_config(workdir)
  sampler = sampling.Sampler(cfg, sampling.Source(workdir=workdir, step=1), batch=8)
  unet = nnx.merge(sampler.graph, jax.device_get(sampler.params))
  vae = nnx.merge(sampler.vae_graph, jax.device_get(sampler.vae))
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  abar = np.cumprod(1.0 - betas)[int(cfg.model.label_t)]
  a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
  for i, prompt in enumerate(PROMPTS):
    cond = sampler.encoder.encode([prompt])
    for seed in SEEDS:
      z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), (4, 4, 4)))
      x = cfg.model.input_scale * z[None]
      eps = np.asarray(unet(x, np.full((1,), cfg.model.label_t, np.float32), cond["context"],
                            text_embeds=cond["pooled"], time_ids=cond["time_ids"]), np.float64)
      x0 = (x - s * eps) / a
      img = np.asarray(vae.decode(vae.unscale_latents(x0.astype(np.float32))), np.float64)[0]
      expected = np.floor(np.clip((np.clip(img, -1, 1) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.int64)
      got = _png(os.path.join(sampled[1], f"{i:05d}_{seed}.png")).astype(np.int64)
      assert np.abs(got - expected).max() <= 1, (prompt, seed)     # float32 vs float64 read-out
      assert np.mean(got != expected) < 0.02, (prompt, seed)


def test_rerun_samples_only_missing_files(run, sampled):
  workdir, prompts, _ = run
  out = sampled[1]
  victim = os.path.join(out, "00001_7.png")
  before = _png(victim)
  others = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".png")}
  os.remove(victim)
  proc = sample(f"--workdir={workdir}", "--step=1", f"--prompts={prompts}", f"--out={out}",
                f"--seeds={','.join(map(str, SEEDS))}", "--batch=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "6 images (3 prompts x 2 seeds): 5 exist, 1 to sample" in proc.stderr
  np.testing.assert_array_equal(_png(victim), before)
  for n, t in others.items():
    if n != "00001_7.png":
      assert os.path.getmtime(os.path.join(out, n)) == t, n


def test_ema_and_latest_step_differ_from_step_one(run, sampled, tmp_path):
  workdir, prompts, _ = run
  for extra, model in ((["--ema"], "/checkpoints/2/gen_ema"), ([], "/checkpoints/2/gen_params")):
    out = str(tmp_path / model.replace("/", "_"))
    proc = sample(f"--workdir={workdir}", f"--prompts={prompts}", f"--out={out}", "--seeds=0", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(open(os.path.join(out, "index.jsonl")).readline())
    assert row["model"].endswith(model) and row["step"] == 2
    assert not np.array_equal(_png(os.path.join(out, "00000_0.png")),
                              _png(os.path.join(sampled[1], "00000_0.png"))), model


@pytest.mark.parametrize("args, starts", [
    (["--workdir={tmp}/missing"], "error: --workdir: "),
    (["--workdir={run}", "--prompts={tmp}/missing.txt"], "error: --prompts: "),
    (["--workdir={run}", "--step=5"], "error: --step=5: "),
    (["--workdir={run}", "--seeds=1,x"], "error: --seeds=1,x: "),
    (["--workdir={run}", "--out={out1}", "--ema"], "error: --out="),
    (["--workdir={run}", "--teacher_steps=0", "--guidance_scale=3"], "error: --guidance_scale: "),
])
def test_bad_input_is_one_line(run, sampled, args, starts):
  workdir, prompts, tmp = run
  fill = dict(run=workdir, tmp=str(tmp), out1=sampled[1])
  base = {"--prompts": prompts, "--out": str(tmp / "bad_out")}
  given = [a.format(**fill) for a in args]
  for flag, value in base.items():
    if not any(a.startswith(flag + "=") for a in given):
      given.append(f"{flag}={value}")
  proc = sample(*given)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(starts), proc.stderr[-500:]
  assert not os.path.exists(tmp / "bad_out" / "index.jsonl")


def test_exported_generator_folder_samples_the_same_images(run, tmp_path):
  """--config with --generator=<the run's diffusers export> equals --workdir at the exported step."""
  workdir, prompts, _ = run
  outs = {}
  for name, args in (("export", ["--config=configs/sdxl.py:tiny", f"--generator={workdir}/export/unet"]),
                     ("checkpoint", [f"--workdir={workdir}", "--step=2"])):
    outs[name] = str(tmp_path / name)
    proc = sample(*args, f"--prompts={prompts}", f"--out={outs[name]}", "--seeds=0,7", "--batch=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(open(os.path.join(outs["export"], "index.jsonl")).readline())
  assert row["model"] == os.path.join(workdir, "export", "unet") and row["step"] is None
  for name in sorted(n for n in os.listdir(outs["checkpoint"]) if n.endswith(".png")):
    np.testing.assert_array_equal(_png(os.path.join(outs["export"], name)),
                                  _png(os.path.join(outs["checkpoint"], name)), name)


@pytest.mark.multiprocess
def test_two_processes_write_the_same_files(run, sampled, tmp_path):
  """2 processes x 1 device (gloo): each encodes its half of every batch, process 0's view of
  the existing files is used by both, the images are gathered and process 0 writes them."""
  from tests.cli_util import free_port
  workdir, prompts, _ = run
  out, port = str(tmp_path / "two"), free_port()
  os.makedirs(out)
  Image.fromarray(_png(os.path.join(sampled[1], "00000_0.png"))).save(os.path.join(out, "00000_0.png"))
  procs = [subprocess.Popen([sys.executable, "-m", "didr_jax.sample", f"--workdir={workdir}", "--step=1",
                             f"--prompts={prompts}", f"--out={out}", f"--seeds={','.join(map(str, SEEDS))}",
                             "--batch=2", f"--coordinator_address=localhost:{port}", "--num_processes=2",
                             f"--process_id={r}"], cwd=ROOT, env=env(1), stderr=subprocess.PIPE, text=True)
           for r in range(2)]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert "6 images (3 prompts x 2 seeds): 1 exist, 5 to sample" in logs[0]
  names = sorted(n for n in os.listdir(sampled[1]) if n.endswith(".png"))
  assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == names
  for n in names:
    np.testing.assert_array_equal(_png(os.path.join(out, n)), _png(os.path.join(sampled[1], n)), n)
  assert open(os.path.join(out, "index.jsonl")).read() == open(os.path.join(sampled[1], "index.jsonl")).read()
