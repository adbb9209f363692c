"""Our jitted UNet vs diffusers PyTorch eager on the same CPU: same weights, same inputs, one run.

  PYTHONPATH=. python benchmarks/unet.py [--batch=4] [--size=32] [--iters=5] [--threads=0]

Mid-size SDXL-shaped UNet (block_out_channels (64, 128, 256), text_time conditioning, 64-wide
heads, linear projections). Times forward and forward+backward (gradients w.r.t. all parameters
of sum(out * w), i.e. a training step without the optimizer), prints both, their ratio, XLA's FLOP
count of each compiled program and the achieved GFLOP/s. Needs torch + diffusers (test deps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402

from tests import clip_torch_env  # noqa: F401,E402  (CPU torch next to a CUDA torchvision wheel)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from didr_jax.models import from_diffusers  # noqa: E402

CONFIG = dict(
    sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2,
    attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2), cross_attention_dim=512,
    norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=32, projection_class_embeddings_input_dim=256 + 6 * 32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def build(batch: int, size: int):
  """(torch model in train mode, our graphdef, our params, numpy inputs x, t, ctx, pooled, time_ids
  and the loss weights w): the same random weights on both sides, inputs NHWC."""
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  tm = UNet2DConditionModel(**CONFIG).train()
  folder = tempfile.mkdtemp(prefix="unet_bench_")
  tm.save_pretrained(folder)
  graphdef, params = nnx.split(from_diffusers(folder), nnx.Param)
  rng = np.random.default_rng(0)
  b, s = batch, size
  x = rng.standard_normal((b, s, s, 4), np.float32)
  t = np.full((b,), 399.0, np.float32)
  ctx = rng.standard_normal((b, 77, CONFIG["cross_attention_dim"]), np.float32)
  pooled = rng.standard_normal((b, 256), np.float32)
  time_ids = np.tile(np.array([[256, 256, 0, 0, 256, 256]], np.float32), (b, 1))
  w = rng.standard_normal((b, s, s, 4), np.float32)
  return tm, graphdef, params, (x, t, ctx, pooled, time_ids, w)


def timed(fn, iters: int) -> float:
  """Median wall seconds of ``fn()`` over ``iters`` calls after one warm-up call."""
  fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  p.add_argument("--force", action="store_true", help="print the ratios on a busy machine too")
  args = p.parse_args()
  record = LoadRecord(args.force)
  torch.set_num_threads(args.threads or os.cpu_count())
  tm, graphdef, params, (x, t, ctx, pooled, time_ids, w) = build(args.batch, args.size)
  inputs = [jnp.asarray(a) for a in (x, t, ctx, pooled, time_ids, w)]

  def fwd(params, x, t, ctx, pooled, time_ids, w):
    return nnx.merge(graphdef, params)(x, t, ctx, text_embeds=pooled, time_ids=time_ids)

  def loss(params, *a):
    return jnp.sum(fwd(params, *a) * a[-1])

  t0 = time.perf_counter()
  fwd_c = jax.jit(fwd).lower(params, *inputs).compile()
  t1 = time.perf_counter()
  grad_c = jax.jit(jax.value_and_grad(loss)).lower(params, *inputs).compile()
  t2 = time.perf_counter()
  ours_fwd = timed(lambda: fwd_c(params, *inputs).block_until_ready(), args.iters)
  ours_bwd = timed(lambda: jax.block_until_ready(grad_c(params, *inputs)), args.iters)

  tx, tctx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx)
  added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
  tt, tw = torch.from_numpy(t), torch.from_numpy(w.transpose(0, 3, 1, 2).copy())

  def torch_fwd():
    with torch.no_grad():
      return tm(tx, tt, tctx, added_cond_kwargs=added).sample

  def torch_step():
    tm.zero_grad(set_to_none=True)
    (tm(tx, tt, tctx, added_cond_kwargs=added).sample * tw).sum().backward()

  ours_out = np.asarray(fwd_c(params, *inputs))
  ref_out = torch_fwd().numpy().transpose(0, 2, 3, 1)
  err = float(np.abs(ours_out - ref_out).max() / np.abs(ref_out).max())
  torch_fwd_s = timed(torch_fwd, args.iters)
  torch_bwd_s = timed(torch_step, args.iters)

  f_fwd, f_bwd = flops_of(fwd_c), flops_of(grad_c)
  n_params = sum(p.numel() for p in tm.parameters())
  print(f"UNet {CONFIG['block_out_channels']}, {n_params / 1e6:.1f}M params, batch {args.batch}, "
        f"{args.size}x{args.size} latents, 77 tokens; {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}")
  print(f"compile: forward {t1 - t0:.1f} s, forward+backward {t2 - t1:.1f} s; "
        f"forward parity max|err|/max|ref| = {err:.1e}")
  quiet = record.done()
  print("| step | ours (jit) s | torch eager s | torch / ours | XLA GFLOP | ours GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for name, ours, ref, fl in (("forward", ours_fwd, torch_fwd_s, f_fwd),
                              ("forward+backward", ours_bwd, torch_bwd_s, f_bwd)):
    ratio = f"{ref / ours:.2f}x" if quiet else "-"
    print(f"| {name} | {ours:.3f} | {ref:.3f} | {ratio} | {fl / 1e9:.1f} | {fl / ours / 1e9:.1f} |")


if __name__ == "__main__":
  main()
