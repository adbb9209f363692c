"""Evaluation throughput on this CPU: images/s of the FID Inception (pool3, 299x299) and of the
ViT-L/14 and ViT-H/14 CLIP image towers (224x224: CLIPScore / aesthetic, PickScore / HPSv2) and
of ImageReward, ours (jitted JAX) vs the PyTorch references (pytorch-fid's network;
transformers' CLIPModel; timm + transformers for BLIP) on the same random weights and
images, in one run; and images/s of sampling the tiny SDXL-shaped reference (one guided DDIM step)
through ``didr_jax.pipelines.sampling`` (model + VAE decode + PNG-ready uint8, 1 device).

    PYTHONPATH=. python benchmarks/evaluate.py [--batch 4] [--reps 3] [--force]

Random weights at the real architectures (no weights are available here); the official PIL
preprocessing is timed on its own (it is the same numpy code for both). Needs the test
dependencies (torch, transformers, pytorch-fid).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests import clip_torch_env  # noqa: E402,F401  (torchvision workaround; before transformers)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import LoadRecord  # noqa: E402


def median_time(fn, reps: int) -> float:
  fn()   # compile / warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def inception(batch, reps, tmp):
  from tests.test_inception_fid import pf_inception as pf, random_fid_state
  from didr_jax.convert import convert_file
  from didr_jax.metrics.fid import clean_resize
  from didr_jax.models.inception_mapping import load_inception
  state = random_fid_state(0)
  torch.save(state, os.path.join(tmp, "inc.pth"))
  convert_file(os.path.join(tmp, "inc.pth"), os.path.join(tmp, "inc.safetensors"))
  orig = pf.load_state_dict_from_url
  pf.load_state_dict_from_url = lambda *a, **k: state
  ref = pf.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
  pf.load_state_dict_from_url = orig
  ours = load_inception(os.path.join(tmp, "inc.safetensors"))
  images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
  t_resize = median_time(lambda: np.stack([clean_resize(im) for im in images]), reps)
  x = np.stack([clean_resize(im) for im in images]) / 255.0
  fwd = jax.jit(lambda m, v: m(v))
  xj = x.astype(np.float32)
  t_ours = median_time(lambda: fwd(ours, xj).block_until_ready(), reps)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
  with torch.no_grad():
    t_ref = median_time(lambda: ref(xt), reps)
  return {"clean resize (PIL)": t_resize, "ours": t_ours, "pytorch-fid": t_ref}


# Image towers of the CLIP metrics (the text towers are cut to 2 layers: only images are timed).
TOWERS = {
    "CLIP ViT-L/14 image tower (224x224; CLIPScore, aesthetic)":
        (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              hidden_act="quick_gelu"), 768),
    "CLIP ViT-H/14 image tower (224x224; PickScore, HPSv2)":
        (dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
              hidden_act="gelu"), 1024),
}


def clip_tower(batch, reps, tmp, vision, projection):
  from transformers import CLIPConfig, CLIPModel
  from didr_jax.evaluate import official
  from didr_jax.rewards.clip_rewards import load_clip
  from flax import nnx
  cfg = CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                    num_attention_heads=12),
                   vision_config=dict(image_size=224, patch_size=14, **vision), projection_dim=projection)
  torch.manual_seed(0)
  ref = CLIPModel(cfg).eval()
  folder = os.path.join(tmp, f"clip{vision['hidden_size']}")
  ref.save_pretrained(folder)
  graph, params = nnx.split(load_clip(folder))
  embed = jax.jit(lambda p, v: nnx.merge(graph, p).encode_image(v))
  images = np.random.default_rng(1).integers(0, 256, (batch, 512, 512, 3), dtype=np.uint8)
  t_pre = median_time(lambda: official.preprocess(images, 224, "hf_crop"), reps)
  px = official.preprocess(images, 224, "hf_crop")
  t_ours = median_time(lambda: embed(params, px).block_until_ready(), reps)
  pt = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    t_ref = median_time(lambda: ref.get_image_features(pixel_values=pt), reps)
  return {"hf_crop preprocessing (PIL)": t_pre, "ours": t_ours, "transformers": t_ref}


def imagereward(batch, reps, tmp):
  """ImageReward at its real size (BLIP ViT-L/16 at 224, BERT-base with cross-attention), through
  the official tv_crop path; the torch side is tests/reward_imagereward.py's timm ViT +
  transformers' BlipTextModel + the MLP head."""
  from tests import reward_imagereward as ri
  from didr_jax.evaluate import official
  from didr_jax import rewards
  vit = dict(image_size=224, patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096)
  bert = dict(ri.BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512)
  ref = ri.build(os.path.join(tmp, "imagereward"), vit=vit, bert=bert)
  ours = rewards.load("imagereward", os.path.join(tmp, "imagereward", "ImageReward.safetensors"),
                      vision=ri.vision_config(vit))
  images = np.random.default_rng(2).integers(0, 256, (batch, 512, 512, 3), dtype=np.uint8)
  t_pre = median_time(lambda: official.preprocess(images, 224, "tv_crop"), reps)
  px = official.preprocess(images, 224, "tv_crop")
  ids = np.asarray(ours.tokenize(["a photo of a red cat"] * batch))
  score = jax.jit(ours.score_pixels)
  t_ours = median_time(lambda: score(ours.params, px, ids).block_until_ready(), reps)
  pt, it = torch.from_numpy(px.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids.astype(np.int64))

  def torch_score():
    tokens = ref.visual_encoder.forward_features(pt)
    out = ref.text_encoder(input_ids=it, attention_mask=(it != 0).long(), encoder_hidden_states=tokens,
                           encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long))
    return ref.mlp(out.last_hidden_state[:, 0])
  with torch.no_grad():
    t_ref = median_time(torch_score, reps)
  return {"tv_crop preprocessing (PIL)": t_pre, "ours": t_ours, "timm + transformers": t_ref}


def sampling(batch, reps):
  from configs.sdxl import get_config
  from didr_jax.pipelines import sampling as sp
  cfg = get_config("tiny")
  src = sp.Source(generator=None, teacher_steps=1)
  sampler = sp.Sampler(cfg, src, batch=batch * jax.device_count())
  prompts = ["a red cube"] * sampler.batch
  items = [sp.Item(i, 0) for i in range(sampler.batch)]
  return {"tiny reference, 1 DDIM step": median_time(lambda: sampler.batch_images(prompts, items), reps)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--force", action="store_true", help="print ratios on a busy machine too")
  args = ap.parse_args()
  record = LoadRecord(args.force)
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    rows["FID Inception (299x299)"] = inception(args.batch, args.reps, tmp)
    for name, (vision, projection) in TOWERS.items():
      rows[name] = clip_tower(args.batch, args.reps, tmp, vision, projection)
    rows["ImageReward (BLIP ViT-L/16 + BERT-base, 224x224)"] = imagereward(args.batch, args.reps, tmp)
  rows["sampling"] = sampling(args.batch, args.reps)
  ratios = record.done()
  print(f"\nbatch {args.batch}, median of {args.reps}; images/s (seconds per batch)")
  for name, times in rows.items():
    print(f"{name}:")
    for k, t in times.items():
      print(f"  {k:32s} {args.batch / t:8.2f} images/s  ({t:.3f} s)")
    if ratios and "ours" in times:
      ref = [k for k in times if k not in ("ours",) and "(PIL)" not in k][0]
      print(f"  ours / {ref}: {times[ref] / times['ours']:.2f}x the reference's throughput")


if __name__ == "__main__":
  main()
