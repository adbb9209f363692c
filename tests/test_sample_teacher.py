"""The teacher path of ``didr_jax.sample`` (``--teacher_steps``) against diffusers' DDIMScheduler:
the same timesteps, and the images of its last ``pred_original_sample`` when the scheduler is
stepped with the tiny reference's classifier-free-guided eps (diffusers' guidance_scale form)."""
import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from flax import nnx

from configs.sdxl import get_config
from didr_jax.pipelines import sampling

pytestmark = pytest.mark.parity
STEPS, GUIDANCE = 4, 3.0
PROMPTS = ["a red cube", "a cat in the snow"]


def _scheduler():
  s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1, prediction_type="epsilon")
  s.set_timesteps(STEPS)
  return s


def test_timesteps_are_diffusers_leading_spacing():
  for n in (1, 4, 25, 50):
    s = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    s.set_timesteps(n)
    np.testing.assert_array_equal(sampling.teacher_timesteps(n), s.timesteps.numpy().astype(np.float32))


def test_teacher_images_equal_diffusers_ddim_with_guidance():
  cfg = get_config("tiny")
  src = sampling.Source(teacher_steps=STEPS, guidance_scale=GUIDANCE)
  identity = sampling.check_source(src, cfg)
  assert identity["guidance_scale"] == GUIDANCE and identity["step"] is None
  sampler = sampling.Sampler(cfg, src, batch=8)
  items = [sampling.Item(i, seed) for i in range(len(PROMPTS)) for seed in (0, 3)]
  items += [items[-1]] * (8 - len(items))
  got = sampler.batch_images(PROMPTS, items)[:4].astype(np.int64)

  for k, it in enumerate(items[:4]):
    expected = _diffusers_image(sampler, PROMPTS[it.prompt_index], it)
    assert np.abs(got[k] - expected).max() <= 1, it
    assert np.mean(got[k] != expected) < 0.02, it


def _diffusers_image(sampler, prompt, it):
  """uint8 image of diffusers' DDIMScheduler stepped with the tiny reference's guided eps."""
  unet = nnx.merge(sampler.graph, jax.device_get(sampler.params))
  vae = nnx.merge(sampler.vae_graph, jax.device_get(sampler.vae))
  cond = sampler.encoder.encode([prompt])
  # diffusers' SDXL pipeline (force_zeros_for_empty_prompt): zero context and pooled, same time ids
  uncond = dict(cond, context=np.zeros_like(cond["context"]), pooled=np.zeros_like(cond["pooled"]))

  def eps(x, t, c):
    out = unet(x.astype(np.float32), np.full((1,), t, np.float32), c["context"],
               text_embeds=c["pooled"], time_ids=c["time_ids"])
    return np.asarray(out, np.float64)

  x = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(it.seed), it.prompt_index),
                                   (1, 4, 4, 4)), np.float64)
  sched = _scheduler()
  for t in sched.timesteps:
    e_c, e_u = eps(x, float(t), cond), eps(x, float(t), uncond)
    out = sched.step(torch.from_numpy(e_u + GUIDANCE * (e_c - e_u)), t, torch.from_numpy(x))
    x = out.prev_sample.numpy()
  x0 = out.pred_original_sample.numpy().astype(np.float32)
  img = np.asarray(vae.decode(vae.unscale_latents(x0)), np.float64)[0]
  return np.floor(np.clip((np.clip(img, -1, 1) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.int64)


def test_teacher_cli_images_equal_diffusers_ddim(tmp_path):
  """The same check through ``python -m didr_jax.sample``: the guided reference a training run
  uses (Task.denoiser with the encoder's uncond) fails it if cond and uncond are swapped."""
  import os
  import subprocess
  import sys
  from PIL import Image
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
  out = subprocess.run([sys.executable, "-m", "didr_jax.sample", "--config=configs/sdxl.py:tiny",
                        f"--teacher_steps={STEPS}", f"--guidance_scale={GUIDANCE}",
                        f"--prompts={tmp_path / 'p.txt'}", f"--out={tmp_path / 'out'}", "--seeds=3"],
                       cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert out.returncode == 0, out.stderr[-3000:]
  cfg = get_config("tiny")
  sampler = sampling.Sampler(cfg, sampling.Source(teacher_steps=STEPS, guidance_scale=GUIDANCE), batch=8)
  for i, prompt in enumerate(PROMPTS):
    expected = _diffusers_image(sampler, prompt, sampling.Item(i, 3))
    got = np.asarray(Image.open(tmp_path / "out" / f"{i:05d}_3.png")).astype(np.int64)
    assert np.abs(got - expected).max() <= 1 and np.mean(got != expected) < 0.02, prompt
