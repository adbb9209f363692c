"""The text-to-image pipeline on random tiny SDXL-shaped models (8 CPU devices).

One method end to end through the CLI (metrics, grid PNG, checkpoint, diffusers export that
diffusers loads); the other methods' generator steps in-process; 8 devices == 1 device; resume ==
straight; a NaN reward is skipped then stops the run naming it; no retracing; bad inputs fail
before any compilation with named errors.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from didr_jax import sharding
from didr_jax.pipelines import experiment, validate
from didr_jax.pipelines.t2i import T2I
from didr_jax.training.checkpoint import Checkpointer
from didr_jax.training.loop import NonFiniteError, run_chunks
from tests import t2i_fixtures as tf
from tests.cli_util import run_until_then_sigterm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA CPU compiles dominate these tests; optimisations buy nothing at tiny shapes."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """SIGTERM the CLI after its first step, then rerun the same command (the persistent compilation
  cache spares the rerun its compile)."""
  tmp = tmp_path_factory.mktemp("t2i")
  workdir = str(tmp / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"), **tf.FAST_ENV)
  cmd = [sys.executable, "-m", "didr_jax.main", "--config=configs/sdxl.py:tiny", f"--workdir={workdir}",
         "--config.method=didr"]
  returncode, first = run_until_then_sigterm(cmd, cwd=ROOT, env=env, marker="[didr] step 1/3",
                                             timeout=900)
  assert returncode == 0, first[-4000:]
  assert "stopped by signal 15" in first, first[-4000:]
  assert not os.path.isdir(os.path.join(workdir, "export")), "a preempted run exports nothing"
  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-4000:]
  return workdir, first, second.stderr


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(cli_run):
  workdir, first, second = cli_run
  assert "per device 1 (data x fsdp = 8)" in first
  assert "[didr] step 3/3" in second and "[didr] step 1/3" not in second


@pytest.mark.slow
def test_cli_outputs(cli_run):
  workdir, _, _ = cli_run
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if "didr/gen_loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for k in ("didr/gen_loss", "didr/ta_loss", "didr/reward", "didr/drp_reward", "didr/gen_grad_norm"):
      assert np.isfinite(r[k]), (k, r)
  assert any("eval/reward_mean" in r for r in rows)
  assert os.path.isfile(os.path.join(workdir, "grid_000003.png"))
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_cli_export_loads_in_diffusers(cli_run):
  workdir, _, _ = cli_run
  from tests import clip_torch_env  # noqa: F401  (torchvision workaround before diffusers)
  from diffusers import UNet2DConditionModel
  from didr_jax.weights import read_safetensors
  for name in ("unet", "unet_ema"):
    folder = os.path.join(workdir, "export", name)
    model = UNet2DConditionModel.from_pretrained(folder)
    assert model.config.addition_embed_type == "text_time"
    ours = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    sd = model.state_dict()
    assert set(sd) == set(ours)
    np.testing.assert_array_equal(sd["conv_in.weight"].numpy(), ours["conv_in.weight"])


@pytest.fixture(scope="module")
def pipe8():
  return T2I(tf.tiny_config("dipp"))


@pytest.fixture(scope="module")
def dipp_chunk(pipe8):
  """The dipp generator update compiled once on 8 devices, shared by several tests."""
  return tf.gen_chunk(pipe8, tf.tiny_config("dipp"))


def test_fsdp_shards_params_and_moments(pipe8):
  """Per-device bytes of the UNet params, Adam moments and EMA within 1.2x of 1/8 on 8 fsdp devices
  (only dimensions 8 does not divide, e.g. the 4-channel conv_out, stay whole)."""
  state = tf.fresh_state(pipe8, tf.tiny_config("dipp"))
  for name, tree in (("gen_params", state.gen_params), ("ta_params", state.ta_params),
                     ("gen_opt", state.gen_opt), ("ta_opt", state.ta_opt), ("gen_ema", state.gen_ema)):
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim > 0]
    whole = sum(x.nbytes for x in leaves)
    local = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    assert local / whole < 1.2 / 8, (name, local / whole)


@pytest.mark.parametrize("method", ["di", "distar"])
def test_other_methods_generator_step(pipe8, method):
  cfg = tf.tiny_config(method)
  chunk, _ = tf.gen_chunk(pipe8, cfg)
  state = tf.fresh_state(pipe8, cfg)
  before = sharding.to_host(jax.tree.leaves(state.gen_params)[0])
  state, metrics = chunk(state, pipe8.frozen(), tf.conds(pipe8, 0))
  assert np.isfinite(sharding.to_host(metrics["gen_loss"])).all()
  assert int(sharding.to_host(state.bad_steps)) == 0
  assert not np.array_equal(sharding.to_host(jax.tree.leaves(state.gen_params)[0]), before)


def test_sharded_equals_single_device_and_restores_across_meshes(pipe8, dipp_chunk, tmp_path):
  cfg = tf.tiny_config("dipp")
  state8, _ = dipp_chunk[0](tf.fresh_state(pipe8, cfg), pipe8.frozen(), tf.conds(pipe8, 0))
  pipe1 = T2I(cfg, devices=jax.devices()[:1])
  chunk1, _ = tf.gen_chunk(pipe1, cfg)
  state1 = tf.fresh_state(pipe1, cfg)
  state1, _ = chunk1(state1, pipe1.frozen(), tf.conds(pipe1, 0))
  a = jax.tree.map(sharding.to_host, state8.gen_params)
  b = jax.tree.map(sharding.to_host, state1.gen_params)
  err = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert err < 1e-5, err
  # the 8-device checkpoint restores onto the 1-device mesh, bit for bit
  ck = Checkpointer(str(tmp_path / "ck"), identity={"t": 1}, max_to_keep=1, save_every=1,
                    async_save=False)
  ck.save(1, state8, force=True)
  restored = ck.restore(tf.fresh_state(pipe1, cfg))
  ck.close()
  assert jax.tree.leaves(restored.gen_params)[0].sharding.mesh.size == 1
  for x, y in zip(jax.tree.leaves(state8), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(sharding.to_host(x), sharding.to_host(y))


def test_resume_equals_straight_and_no_retrace(pipe8, dipp_chunk, tmp_path):
  cfg = tf.tiny_config("dipp")
  chunk, traces = dipp_chunk
  frozen = pipe8.frozen()
  sampler = tf.sampler(cfg)
  conds_for = lambda s: pipe8.conds(sampler, s, 1)
  straight = tf.fresh_state(pipe8, cfg)
  straight = run_chunks(name="s", state=straight, frozen=frozen, chunk=chunk, steps_per_chunk=1,
                        num_steps=3, conds_for=conds_for, writer=None)
  ident = experiment.identity(cfg, sampler)
  ck = Checkpointer(str(tmp_path / "ck"), identity=ident, max_to_keep=2, save_every=1, async_save=False)
  first = tf.fresh_state(pipe8, cfg)
  run_chunks(name="a", state=first, frozen=frozen, chunk=chunk, steps_per_chunk=1, num_steps=2,
             conds_for=conds_for, checkpointer=ck, writer=None)
  ck.close()
  ck = Checkpointer(str(tmp_path / "ck"), identity=ident, max_to_keep=2, save_every=1, async_save=False)
  like = tf.fresh_state(pipe8, cfg)
  resumed = ck.restore(like)
  assert int(sharding.to_host(resumed.step)) == 2
  resumed = run_chunks(name="b", state=resumed, frozen=frozen, chunk=chunk, steps_per_chunk=1,
                       num_steps=3, conds_for=conds_for, writer=None)
  ck.close()
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(sharding.to_host(x), sharding.to_host(y))
  assert traces[0] == 1, f"the step was traced {traces[0]} times"


def test_nan_reward_skipped_then_stops(pipe8, dipp_chunk):
  cfg = tf.tiny_config("dipp")
  chunk, _ = dipp_chunk
  frozen = pipe8.frozen()
  frozen["reward"] = jax.tree.map(lambda x: x * np.float32("nan"), frozen["reward"])  # same shapes
  state = tf.fresh_state(pipe8, cfg)
  before = jax.tree.map(sharding.to_host, state.gen_params)
  held = experiment.LastMetrics(chunk)
  seen = []

  def on_chunk(step, st_, host):
    seen.append(int(sharding.to_host(st_.bad_steps)))
    if step == 1:
      for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(st_.gen_params)):
        np.testing.assert_array_equal(x, sharding.to_host(y))
    experiment.check_finite(st_, held.metrics, 2, step)

  with pytest.raises(NonFiniteError, match="first non-finite quantity 'reward'"):
    run_chunks(name="nan", state=state, frozen=frozen, chunk=held, steps_per_chunk=1, num_steps=5,
               conds_for=lambda s: tf.conds(pipe8, s), writer=None, on_chunk=on_chunk)
  assert seen == [1, 2]


# ---- bad inputs: named errors before any model is built or compiled ----

def test_missing_reference_folder(tmp_path):
  cfg = tf.real_config(tmp_path, reference=str(tmp_path / "nope"))
  with pytest.raises(validate.ConfigError, match=r"config.model.reference: .*nope: folder not found; "
                     r"expected a diffusers folder with unet/, vae/, text_encoder/, text_encoder_2/"):
    validate.validate(cfg)


def test_missing_subfolder_named(tmp_path):
  cfg = tf.real_config(tmp_path)
  os.remove(os.path.join(cfg.model.reference, "text_encoder_2", "config.json"))
  with pytest.raises(validate.ConfigError, match=r"text_encoder_2/config.json missing"):
    validate.validate(cfg)


def test_wrong_unet_for_config(tmp_path):
  cfg = tf.real_config(tmp_path, unet_extra={"addition_embed_type": None})
  with pytest.raises(validate.ConfigError, match=r"addition_embed_type=None; an SDXL UNet has 'text_time'"):
    validate.validate(cfg)


def test_missing_generator_and_reward(tmp_path):
  cfg = tf.real_config(tmp_path, generator=str(tmp_path / "gen.bin"))
  with pytest.raises(validate.ConfigError, match=r"config.model.generator: .*gen.bin: not found"):
    validate.validate(cfg)
  cfg = tf.real_config(tmp_path, reward=str(tmp_path / "none"))
  with pytest.raises(validate.ConfigError, match=r"config.reward.path: .*none: not found"):
    validate.validate(cfg)


def test_empty_prompt_file(tmp_path):
  cfg = tf.real_config(tmp_path, prompts="")
  with pytest.raises(validate.ConfigError, match=r"config.data.prompts: .*no prompts"):
    validate.validate(cfg)


def test_batch_not_divisible_by_mesh(tmp_path):
  cfg = tf.real_config(tmp_path, batch=12)
  with pytest.raises(validate.ConfigError, match=r"config.align.batch: 12 is not divisible by the "
                     r"mesh's data x fsdp = 8 devices"):
    validate.validate(cfg)


def test_cli_bad_input_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/sdxl.py",
                         f"--workdir={tmp_path}/w", f"--config.model.reference={tmp_path}/missing"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: config.model.reference:" in proc.stderr and "folder not found" in proc.stderr
  assert "compiled" not in proc.stderr


def test_sd15_tiny_generator_reward_and_uncond():
  """SD1.5 wiring: one text tower, no text_time inputs, unconditional input = encoding of ""."""
  from configs.sd15 import get_config
  cfg = get_config("tiny")
  pipe = T2I(cfg)
  assert pipe.unet_graph is not None and cfg.model.label_t == 999
  cond, z = pipe.eval_inputs(cfg.eval.prompts, 0)
  assert set(cond) == {"context", "reward_ids"}
  images, rewards = pipe.eval_fn()(pipe.gen_init, pipe.frozen(), cond, z)
  assert images.shape == (len(cfg.eval.prompts), 16, 16, 3)
  assert np.isfinite(sharding.to_host(rewards)).all()
  empty = pipe.encoder.encode([""])["context"][0]
  np.testing.assert_array_equal(sharding.to_host(pipe.encoder.uncond(cond)["context"])[1], empty)


def test_real_run_loaders_on_disk_folders(tmp_path):
  """The default (real) config over on-disk diffusers / transformers folders of tiny models:
  validation passes, every loader runs, and generator + VAE + reward give finite scores."""
  from tests import t2i_real_folder
  ref, reward = t2i_real_folder.write_sdxl_folders(str(tmp_path))
  cfg = tf.real_config(tmp_path, reference=ref, reward=reward)
  cfg.model.dtype, cfg.model.remat, cfg.data.resolution = "float32", "none", 16
  cfg.model.generator = os.path.join(ref, "unet", "diffusion_pytorch_model.safetensors")
  validate.validate(cfg)
  pipe = T2I(cfg)
  cond, z = pipe.eval_inputs(["a red cube", "a cat"], 0)
  assert cond["context"].shape == (2, 77, 48) and cond["pooled"].shape == (2, 32)
  _, rewards = pipe.eval_fn()(pipe.gen_init, pipe.frozen(), cond, z)
  assert np.isfinite(sharding.to_host(rewards)).all()
