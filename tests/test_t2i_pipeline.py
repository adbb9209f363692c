"""The text-to-image pipeline in-process on random tiny SDXL-shaped models.

FSDP places 1/8 of every UNet, moment and EMA per device; the compiled chunk runs 3 steps; a NaN
reward is skipped, then stops the run naming it; bad inputs fail before any compilation with named
errors; SD1.5 wiring; the real-run loaders on on-disk folders. The 8-device CLI runs of every
method, resume and 1 vs 8 devices: tests/test_t2i_cli*.py.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from didr_jax import sharding
from didr_jax.pipelines import experiment, validate
from didr_jax.pipelines.t2i import T2I
from didr_jax.training.loop import NonFiniteError, run_chunks
from tests import t2i_fixtures as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_fast_compiles = pytest.fixture(scope="module", autouse=True)(tf.fast_compiles)


@pytest.fixture(scope="module")
def pipe8():
  return T2I(tf.tiny_config("dipp"))


@pytest.fixture(scope="module")
def pipe1():
  return T2I(tf.tiny_config("dipp"), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def dipp_chunk(pipe1):
  """The dipp generator update compiled once on 1 device (the 8-device runs are the CLI tests')."""
  return tf.gen_chunk(pipe1, tf.tiny_config("dipp"))


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


def test_resume_restores_onto_abstract_shapes_without_a_fresh_state(pipe8, tmp_path, monkeypatch):
  """A resumed run restores the checkpoint onto ShapeDtypeStructs carrying the fresh state's
  shardings: the restored arrays equal the saved ones and sit where a fresh state's would, and no
  fresh state is built (the live bytes while orbax restores are those of the pipeline alone)."""
  from didr_jax.training.checkpoint import Checkpointer
  cfg = tf.tiny_config("dipp")
  parts = experiment.build_training(pipe8, cfg)
  saved = tf.fresh_state(pipe8, cfg)
  saved = saved.replace(step=saved.step + 5, gen_ema=jax.tree.map(lambda x: x * 0.5, saved.gen_ema))
  ckpt = Checkpointer(str(tmp_path / "ck"), identity={}, max_to_keep=1, save_every=1, async_save=False)
  ckpt.save(5, saved)
  expected = jax.tree.map(sharding.to_host, saved)
  shardings = jax.tree.map(lambda x: x.sharding, saved)
  del saved
  live = {}
  restore = ckpt.restore

  def counting_restore(like):
    live["during"] = sum(x.nbytes for x in jax.live_arrays())
    return restore(like)

  monkeypatch.setattr(ckpt, "restore", counting_restore)
  monkeypatch.setattr(experiment, "init_state", lambda *a: pytest.fail("built a fresh state"))
  before = sum(x.nbytes for x in jax.live_arrays())
  state = experiment.restore_or_init_state(pipe8, cfg, parts["gen_tx"], parts["ta_tx"], ckpt)
  assert live["during"] == before
  assert int(sharding.to_host(state.step)) == 5
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(sharding.to_host(got), want)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  ckpt.close()


def test_compiled_chunk_runs_step_after_step(pipe1, dipp_chunk):
  """The chunk is compiled ahead of time, so it cannot retrace: a state or cond of another shape,
  dtype or sharding would be refused. It takes back the state it returns, with each step's conds,
  for 3 steps, and moves the generator. (That the step keeps its state's avals under plain jit:
  tests/test_value_level.py::test_jitted_outer_step_chunks_keep_their_avals.)"""
  assert isinstance(dipp_chunk, jax.stages.Compiled)
  state = tf.fresh_state(pipe1, pipe1.cfg)
  before = [sharding.to_host(x) for x in jax.tree.leaves(state.gen_params)]
  state = run_chunks(name="r", state=state, frozen=pipe1.frozen(), chunk=dipp_chunk,
                     steps_per_chunk=1, num_steps=3,
                     conds_for=lambda s: tf.conds(pipe1, s), writer=None)
  assert int(sharding.to_host(state.step)) == 3 and int(sharding.to_host(state.bad_steps)) == 0
  after = [sharding.to_host(x) for x in jax.tree.leaves(state.gen_params)]
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(after, before)) > 0


def test_prompt_conds_depend_on_the_batch_only(pipe1):
  """A batch's embeddings do not depend on what an encoder saw before (no history-dependent cache;
  fixed text-encoder blocks), so a resumed run sees the conds of an uninterrupted one; the
  precomputed table of the whole prompt set agrees."""
  from didr_jax.pipelines.conditioning import PromptEncoder, PromptTable
  enc = pipe1.encoder
  fresh = lambda: PromptEncoder("sdxl", enc.towers, enc.reward_tokenizer, resolution=enc.resolution,
                                dtype=enc.dtype, block=enc.block)
  sampler = tf.sampler(pipe1.cfg)
  batch = sampler.batch(2)
  first = fresh().encode(batch)
  seasoned = fresh()
  for part in (batch[:3], batch[3:5] + ["a prompt never seen"], sampler.batch(0)):
    seasoned.encode(part)
  again = seasoned.encode(batch)
  assert set(first) == {"context", "pooled", "time_ids", "reward_ids"}
  for k in first:
    np.testing.assert_array_equal(again[k], first[k], err_msg=k)
  table = PromptTable(enc, sampler.prompts)
  assert table.rows["context"].shape[0] == len(sampler.prompts) == 12
  looked_up = table.lookup(sampler.indices(2))
  for k in first:   # the same prompts encoded in other blocks: float round-off at most
    np.testing.assert_allclose(looked_up[k], first[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(looked_up["reward_ids"], first["reward_ids"])


def test_nan_reward_skipped_then_stops(pipe1, dipp_chunk):
  cfg = tf.tiny_config("dipp")
  chunk = dipp_chunk
  frozen = pipe1.frozen()
  frozen["reward"] = jax.tree.map(lambda x: x * np.float32("nan"), frozen["reward"])  # same shapes
  state = tf.fresh_state(pipe1, cfg)
  before = jax.tree.map(sharding.to_host, state.gen_params)
  seen = []

  def on_chunk(step, st_):
    seen.append(("state", step, int(sharding.to_host(st_.bad_steps))))
    if step == 1:
      for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(st_.gen_params)):
        np.testing.assert_array_equal(x, sharding.to_host(y))

  def on_settled(step, metrics, host):
    seen.append(("metrics", step, int(sharding.to_host(metrics["bad_steps"])[-1])))
    experiment.check_finite(metrics, 2, step)

  with pytest.raises(NonFiniteError, match="2 consecutive .* at step 2: first non-finite quantity 'reward'"):
    run_chunks(name="nan", state=state, frozen=frozen, chunk=chunk, steps_per_chunk=1, num_steps=5,
               conds_for=lambda s: tf.conds(pipe1, s), writer=None, on_chunk=on_chunk,
               on_settled=on_settled)
  # a step's metrics are read after the next step is dispatched, one chunk late
  assert seen == [("state", 1, 1), ("metrics", 1, 1), ("state", 2, 2), ("metrics", 2, 2)], seen


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
  cfg = tf.real_config(tmp_path, batch=16)
  cfg.align.grad_accum = 4
  with pytest.raises(validate.ConfigError, match=r"config.align.grad_accum: 4: the batch 16 must split "
                     r"into 4 microbatches each divisible by data x fsdp = 8 devices"):
    validate.validate(cfg)


def test_ta_warmup_must_fit_the_run_and_the_chunks(tmp_path):
  cfg = tf.real_config(tmp_path)
  cfg.align.ta_warmup_steps = cfg.align.steps
  with pytest.raises(validate.ConfigError, match=r"config.align.ta_warmup_steps: 20000: expected 0 <= "
                     r"warm-up < align.steps = 20000"):
    validate.validate(cfg)
  cfg.align.ta_warmup_steps = 305
  with pytest.raises(validate.ConfigError, match=r"config.align.ta_warmup_steps: 305: must be a multiple "
                     r"of train.steps_per_chunk = 10"):
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
  cfg.data.precompute_embeddings = True
  pipe = T2I(cfg)
  assert pipe.net_graph is not None and cfg.model.label_t == 999
  cond, z = pipe.eval_inputs(cfg.eval.prompts, 0)
  assert set(cond) == {"context", "reward_ids"}
  images, rewards = pipe.eval_fn()(pipe.gen_init, pipe.frozen(), cond, z)
  assert images.shape == (len(cfg.eval.prompts), 16, 16, 3)
  assert np.isfinite(sharding.to_host(rewards)).all()
  empty = pipe.encoder.encode([""])["context"][0]
  np.testing.assert_array_equal(sharding.to_host(pipe.encoder.uncond(cond)["context"])[1], empty)
  sampler = tf.sampler(cfg)   # precomputed: rows of the whole prompt set, looked up per step
  conds = pipe.conds(sampler, 1, 2)   # align.fresh_ta_prompts: 1 + k_ta batches per step
  assert pipe._table[1].rows["context"].shape[0] == len(cfg.tiny.prompts)
  per = 1 + cfg.align.k_ta
  gen, ta = sharding.to_host(conds["gen"]["context"]), sharding.to_host(conds["ta"]["context"])
  assert ta.shape[:2] == (2, cfg.align.k_ta) and gen.shape[0] == 2
  for i, step in enumerate((1, 2)):
    for j in range(per):     # sampler position step (1 + k_ta) + j; j = 0 is the generator's
      direct = pipe.encoder.encode(sampler.batch(step * per + j))["context"]
      np.testing.assert_allclose(gen[i] if j == 0 else ta[i, j - 1], direct, rtol=1e-5, atol=1e-6)
  assert not np.allclose(ta[0, 0], gen[0]) and not np.allclose(ta[0, 1], ta[0, 0])


@pytest.mark.parity
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
