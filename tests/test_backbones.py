"""The DiT backbones in the trainer, checked against diffusers' / transformers' own code paths on
the ``:tiny`` models (weights exported by us, loaded by them):

- PixArt's one-step read-out (first 4 of 8 output channels as eps, linear betas 1e-4..0.02, t 999)
  equals diffusers' DDIMScheduler prediction of x0 from PixArtTransformer2DModel;
- Z-Image's one-step read-out at t = 1 equals ZImagePipeline's step: the transformer fed
  (1000 - t) / 1000 on unpadded captions, its output negated, one FlowMatchEulerDiscreteScheduler
  step from sigma 1 to 0;
- the Z-Image teacher (time shift 3, guidance g = our augmented w, 2 Euler steps) equals the
  pipeline's loop with the scheduler's shifted sigmas and ``pos + g (pos - neg)``;
- T5 / Qwen3 conditioning rows equal transformers' encoders (last hidden state; hidden_states[-2])
  at the real tokens, and the unconditional rows are the encoding of "".
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.clip_torch_env import torch
from configs import pixart, zimage
from didr_jax import sharding
from didr_jax.diffusion import ddim_sample
from didr_jax.models import from_transformers
from didr_jax.models.diffusers_loading import to_diffusers
from didr_jax.pipelines import backbones
from didr_jax.pipelines.conditioning import HashTokenizer, PromptEncoder
from didr_jax.pipelines.sampling import teacher_timesteps
from didr_jax.pipelines.t2i import T2I
from didr_jax.training.task import Task

pytestmark = pytest.mark.parity

PROMPTS = ["a red cube", "a blue sphere on grass", "a cat", "a city at night in the rain",
           "an old map", "a bowl of fruit", "a sailing boat on a calm sea", "a green bird"]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
  """{name: (T2I of the :tiny config, diffusers folder of its reference network)}."""
  out = {}
  for name, module in (("pixart", pixart), ("zimage", zimage)):
    pipe = T2I(module.get_config("tiny"))
    folder = str(tmp_path_factory.mktemp(name) / "transformer")
    to_diffusers(nnx.merge(pipe.net_graph, jax.tree.map(sharding.to_host, pipe.ref_params)), folder)
    out[name] = (pipe, folder)
  return out


def _inputs(pipe, seed=0):
  cond = pipe.encoder.encode(PROMPTS)
  z = np.random.default_rng(seed).standard_normal((len(PROMPTS),) + tuple(pipe.task.sample_shape))
  return cond, z.astype(np.float32)


def _ours(pipe, fn, *args):
  with sharding.model_context(pipe.mesh, pipe.rules):
    return np.asarray(jax.jit(fn)(*args))


def test_backbone_table_matches_the_configs():
  assert set(backbones.BACKBONES) == {"sdxl", "sd15", "pixart", "zimage"}
  z = zimage.get_config("tiny")
  assert (z.model.label_t, z.model.time_shift, z.align.gen_t_range) == (1.0, 3.0, (0.02, 0.98))
  assert backbones.get("zimage").make_schedule(z).shift == 3.0
  p = pixart.get_config("")
  assert (p.model.label_t, p.objective.cfg_w, p.data.resolution) == (999, 3.5, 512)
  with pytest.raises(ValueError, match="backbone 'dit' unknown"):
    backbones.get("dit")


def test_pixart_one_step_readout_equals_diffusers_ddim(pipes):
  from diffusers import DDIMScheduler, PixArtTransformer2DModel
  pipe, folder = pipes["pixart"]
  cond, z = _inputs(pipe)
  ours = _ours(pipe, pipe.task.generator_apply, pipe.ref_params, z, cond)

  net = PixArtTransformer2DModel.from_pretrained(folder).eval()
  x = torch.from_numpy(z).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = net(x, encoder_hidden_states=torch.from_numpy(cond["context"]),
              timestep=torch.full((len(z),), 999), encoder_attention_mask=torch.from_numpy(
                  cond["mask"].astype(np.int64)),
              added_cond_kwargs={"resolution": torch.from_numpy(cond["resolution"]),
                                 "aspect_ratio": torch.from_numpy(cond["aspect_ratio"])}).sample
  assert out.shape[1] == 8                      # learned variance: eps is the first half
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                        beta_end=0.02, clip_sample=False)
  sched.set_timesteps(1)
  want = sched.step(out[:, :4], 999, x).pred_original_sample.permute(0, 2, 3, 1).numpy()
  assert _rel(ours, want) < 1e-4, _rel(ours, want)
  # the SD schedule (scaled_linear) would give another x0: the betas matter at this tolerance
  sd = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                     beta_end=0.012, clip_sample=False)
  sd.set_timesteps(1)
  assert _rel(ours, sd.step(out[:, :4], 999, x).pred_original_sample.permute(0, 2, 3, 1).numpy()) > 1e-2


def _zimage_torch(folder):
  from diffusers import ZImageTransformer2DModel
  return ZImageTransformer2DModel.from_pretrained(folder).eval()


def _zimage_pipeline_velocity(net, x, t, cond_rows):
  """ZImagePipeline's noise_pred for latents x [B, C, H, W] at scheduler timestep t (= 1000 sigma):
  the transformer on unpadded caption lists at (1000 - t) / 1000, negated."""
  xs = [xi[:, None] for xi in x]
  caps = [torch.from_numpy(c[m]) for c, m in zip(cond_rows["context"], cond_rows["mask"])]
  timestep = ((1000 - t) / 1000).expand(len(xs))
  with torch.no_grad():
    out = net(xs, timestep, caps, return_dict=False)[0]
  return -torch.stack([o.float() for o in out]).squeeze(2)


def test_zimage_one_step_readout_equals_the_pipeline_step(pipes):
  from diffusers import FlowMatchEulerDiscreteScheduler
  pipe, folder = pipes["zimage"]
  cond, z = _inputs(pipe)
  ours = _ours(pipe, pipe.task.generator_apply, pipe.ref_params, z, cond)

  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  sched.set_timesteps(sigmas=[1.0])              # get_default_z_image_sigmas(1)
  t = sched.timesteps[0]
  x = torch.from_numpy(z).permute(0, 3, 1, 2)
  pred = _zimage_pipeline_velocity(_zimage_torch(folder), x, t, cond)
  want = sched.step(pred, t, x).prev_sample.permute(0, 2, 3, 1).numpy()
  assert _rel(ours, want) < 1e-4, _rel(ours, want)


def test_zimage_guided_teacher_equals_the_pipeline_loop(pipes):
  """Two Euler steps with CFG g = 4: our DDIM sampler on the flow (teacher_timesteps, the shifted
  schedule, the pipeline's guidance as augmented w) against the pipeline's loop."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  pipe, folder = pipes["zimage"]
  cond, z = _inputs(pipe, seed=1)
  b, g = pipe.backbone, 4.0
  task = Task(schedule=pipe.schedule, prediction=b.prediction, sample_shape=pipe.task.sample_shape,
              generator_apply=None, network_apply=pipe.task.network_apply, reward_apply=None,
              ta_t_range=(), gen_t_range=(), uncond=pipe.encoder.uncond)
  ts = jnp.asarray(teacher_timesteps(2, flow=True))

  def teacher(params, z, c):
    denoise = task.denoiser(params, g - b.guidance_offset)
    return ddim_sample(lambda x, t, cc: denoise(x, t, cc, True), z, ts, pipe.schedule, c)
  ours = _ours(pipe, teacher, pipe.ref_params, z, cond)

  net = _zimage_torch(folder)
  uncond = {k: np.broadcast_to(v, cond[k].shape) for k, v in pipe.encoder.empty.items()}
  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  sched.set_timesteps(sigmas=[1.0, 0.5])         # get_default_z_image_sigmas(2)
  x = torch.from_numpy(z).permute(0, 3, 1, 2)
  for t in sched.timesteps:
    pos = _zimage_pipeline_velocity(net, x, t, cond)
    neg = _zimage_pipeline_velocity(net, x, t, uncond)
    x = sched.step(pos + g * (pos - neg), t, x).prev_sample
  want = x.permute(0, 2, 3, 1).numpy()
  assert _rel(ours, want) < 1e-4, _rel(ours, want)


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
  """transformers' T5 encoder and Qwen3 decoder, random tiny, saved as safetensors folders."""
  from transformers import Qwen3Config, Qwen3Model, T5Config, T5EncoderModel
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("text")
  t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                               num_layers=2, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
                               dropout_rate=0.0)).eval()
  qwen = Qwen3Model(Qwen3Config(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=64)).eval()
  out = {}
  for name, model in (("t5", t5), ("qwen3", qwen)):
    model.save_pretrained(str(root / name), safe_serialization=True)
    out[name] = (str(root / name), model)
  return out


@pytest.mark.parametrize("backbone, family", [("pixart", "t5"), ("zimage", "qwen3")])
def test_text_rows_equal_transformers(text_folders, backbone, family):
  folder, hf = text_folders[family]
  g, p = nnx.split(from_transformers(folder))      # dispatched on the folder's config.json
  tok = HashTokenizer(1000, 16, with_mask=True)
  enc = PromptEncoder(backbone, [(tok, g, p)], None, resolution=512, dtype=jnp.float32, block=4)
  rows = enc.encode(PROMPTS[:6])                    # two blocks, the second padded
  ids, mask = tok(PROMPTS[:6])
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
             output_hidden_states=True)
  want = (out.last_hidden_state if family == "t5" else out.hidden_states[-2]).numpy()
  real = mask.astype(bool)
  np.testing.assert_array_equal(rows["mask"], real)
  assert _rel(rows["context"][real], want[real]) < 1e-5
  empty_ids, empty_mask = tok([""])
  with torch.no_grad():
    e = hf(input_ids=torch.from_numpy(empty_ids).long(),
           attention_mask=torch.from_numpy(empty_mask).long(), output_hidden_states=True)
  e = (e.last_hidden_state if family == "t5" else e.hidden_states[-2]).numpy()[0]
  u = enc.uncond({k: jnp.asarray(v) for k, v in rows.items()})
  np.testing.assert_array_equal(np.asarray(u["mask"]), np.broadcast_to(empty_mask.astype(bool), real.shape))
  assert _rel(np.asarray(u["context"])[:, :1], np.broadcast_to(e[:1], (6, 1, e.shape[-1]))) < 1e-5
  if backbone == "pixart":   # PixArt's additional conditions: (height, width) and h / w
    np.testing.assert_array_equal(rows["resolution"], np.full((6, 2), 512.0))
    np.testing.assert_array_equal(rows["aspect_ratio"], np.ones((6, 1)))
    np.testing.assert_array_equal(np.asarray(u["resolution"]), rows["resolution"])
  else:
    assert set(rows) == {"context", "mask"}
