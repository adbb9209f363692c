"""Per-method TA-step / generator-step time, XLA FLOPs and compiled peak memory of the t2i
pipeline on a mid-size SDXL-shaped random model; DRP K = 1, 2, 4 for DIDR; per-device memory on
1 vs N devices (FSDP).

  python benchmarks/sdxl_step.py                       # CPU: 8 simulated devices
  python benchmarks/sdxl_step.py --width=64 --resolution=64 --batch=8

Peak memory = compiled argument + output + temp bytes per device (``memory_analysis``; aliased
donated buffers counted once). MFU needs an accelerator's peak FLOP/s: reported only on GPU/TPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs.sdxl import get_config  # noqa: E402
from didr_jax.data import PromptSampler  # noqa: E402
from didr_jax.pipelines import experiment  # noqa: E402
from didr_jax.pipelines.t2i import T2I  # noqa: E402
from didr_jax.training.steps import compile_chunk, scan_chunk  # noqa: E402


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def measure(pipe, cfg, which: str, repeats: int):
  parts = experiment.build_training(pipe, cfg)
  state = experiment.init_state(pipe, cfg, parts["gen_tx"], parts["ta_tx"])
  sampler = PromptSampler(experiment.prompts_of(cfg), global_batch=cfg.align.batch, seed=0)
  conds = pipe.conds(sampler, 0, 1)
  frozen = pipe.frozen()
  t0 = time.time()
  chunk = compile_chunk(scan_chunk(parts[which], 1), state, frozen, conds, pipe.mesh, which)
  compile_s = time.time() - t0
  state, _ = chunk(state, frozen, conds)          # warm-up
  jax.block_until_ready(state)
  t0 = time.time()
  for _ in range(repeats):
    state, _ = chunk(state, frozen, conds)
  jax.block_until_ready(state)
  return dict(ms=1e3 * (time.time() - t0) / repeats, gflops=flops(chunk) / 1e9,
              peak_mib=peak_bytes(chunk) / 2 ** 20,
              args_mib=chunk.memory_analysis().argument_size_in_bytes / 2 ** 20, compile_s=compile_s)


def config(args, method, k):
  cfg = get_config("tiny")
  cfg.method = method
  cfg.objective.drp_k = k
  cfg.tiny.width, cfg.tiny.vae_width = args.width, args.vae_width
  cfg.data.resolution = args.resolution
  cfg.align.batch = args.batch
  cfg.model.remat = args.remat
  return cfg


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--vae_width", type=int, default=32)
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--remat", default="full")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--methods", default="di,dipp,distar,didr")
  p.add_argument("--ks", default="1,2,4")
  args = p.parse_args()
  n = jax.device_count()
  rows = []
  base = config(args, "didr", 2)
  pipe = T2I(base)
  nparams = sum(x.size for x in jax.tree.leaves(pipe.ref_params))
  print(f"device: {jax.devices()[0].platform} x {n}; UNet {nparams / 1e6:.2f}M params, latent "
        f"{pipe.latent}x{pipe.latent}, batch {args.batch}", flush=True)
  rows.append(("ta step", "-", n, measure(pipe, base, "ta_update", args.repeats)))
  for method in args.methods.split(","):
    ks = [int(k) for k in args.ks.split(",")] if method == "didr" else [2]
    for k in ks:
      cfg = config(args, method, k)
      rows.append((f"gen step {method}", k if method == "didr" else "-", n,
                   measure(pipe, cfg, "gen_update", args.repeats)))
      print(rows[-1], flush=True)
  one = T2I(base, devices=jax.devices()[:1])
  rows.append(("gen step didr", 2, 1, measure(one, base, "gen_update", args.repeats)))
  print("\n| step | K | devices | ms/step | GFLOPs | peak MiB/device | args MiB/device | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, k, d, r in rows:
    print(f"| {name} | {k} | {d} | {r['ms']:.0f} | {r['gflops']:.2f} | {r['peak_mib']:.1f} | "
          f"{r['args_mib']:.1f} | {r['compile_s']:.0f} |")
  didr = {k: r for name, k, d, r in rows if name == "gen step didr" and d == n}
  if 1 in didr and 4 in didr:
    print(f"\nremat: peak(K=4) / peak(K=1) = {didr[4]['peak_mib'] / didr[1]['peak_mib']:.2f} (target <= 1.5)")
  if 2 in didr:
    one_r = rows[-1][3]
    print(f"FSDP: args per device {n} dev / 1 dev = {didr[2]['args_mib'] / one_r['args_mib']:.3f} "
          f"(ideal {1 / n:.3f}); peak ratio {didr[2]['peak_mib'] / one_r['peak_mib']:.3f}")
  print("MFU: not measured (CPU run)" if jax.devices()[0].platform == "cpu" else "")


if __name__ == "__main__":
  main()
