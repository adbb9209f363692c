"""Per-method TA-step / generator-step time, XLA FLOPs and compiled peak memory of the t2i
pipeline on a mid-size random model of a backbone (``--backbone``: sdxl, the default, sd15,
pixart, zimage; ``--width`` scales every network, see ``pipelines.tiny.network_config``); DIDR with each DRS
estimator (``--estimators``:
drp at K = 1, 2, 4, snis at K x M, hybrid); per-device memory on 1 vs N devices (FSDP); 1-device
memory with gradient accumulation (``--accums``); LoRA rows next to full fine-tuning
(``--lora_ranks``).

  python benchmarks/sdxl_step.py                       # CPU: 8 simulated devices
  python benchmarks/sdxl_step.py --width=64 --resolution=64 --batch=8
  python benchmarks/sdxl_step.py --methods= --accums=1,2,4    # only the TA and accumulation rows
  python benchmarks/sdxl_step.py --methods=di,dipp --estimators=drp:2,snis:2x4,snis:4x8
  python benchmarks/sdxl_step.py --backbone=zimage --resolution=64 --accums=
  python benchmarks/sdxl_step.py --methods= --accums= --lora_ranks=8,32

Peak memory = compiled argument + output + temp bytes per device (``memory_analysis``; aliased
donated buffers counted once). XLA's cost analysis counts a loop body once, so the DIDR rows add
K - 1 standalone-compiled DRP steps, the snis rows K - 2 standalone-compiled chain steps (a guided
reference JVP on B x M rows), and accumulation rows count M microbatches. MFU needs an
accelerator's peak FLOP/s (``--peak_tflops``). The machine load is printed before and after.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402

import jax  # noqa: E402

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


def drp_call_gflops(pipe, cfg) -> float:
  """Per-device XLA GFLOPs of one DRP step: the guided reference forward, plus its VJP under remat
  (forward again + backward), compiled standalone on the pipeline's mesh."""
  sampler = PromptSampler(experiment.prompts_of(cfg), global_batch=cfg.align.batch, seed=0)
  cond = {k: v[0] for k, v in pipe.conds(sampler, 0, 1).items()}
  x = jax.device_put(jax.numpy.zeros((cfg.align.batch,) + tuple(pipe.task.sample_shape)), pipe.batch_sh)
  t = jax.device_put(jax.numpy.full((cfg.align.batch,), mid_t(pipe)), pipe.cond_sharding(1, 0))

  def forward(p, x, t, c):
    return pipe.task.denoiser(p, cfg.objective.cfg_w)(x, t, c, True)[0]

  def vjp(p, x, t, c, g):
    return jax.vjp(jax.checkpoint(lambda y: forward(p, y, t, c)), x)[1](g)[0]
  with jax.set_mesh(pipe.mesh):
    fwd = jax.jit(forward).lower(pipe.ref_params, x, t, cond).compile()
    bwd = jax.jit(vjp).lower(pipe.ref_params, x, t, cond, x).compile()
  return (flops(fwd) + flops(bwd)) / 1e9


def chain_step_gflops(pipe, cfg, rows: int) -> float:
  """Per-device XLA GFLOPs of one snis chain step on ``rows`` rows: the guided reference's JVP
  (denoiser and its Hutchinson probe product), compiled standalone on the pipeline's mesh."""
  sampler = PromptSampler(experiment.prompts_of(cfg), global_batch=cfg.align.batch, seed=0)
  rep = rows // cfg.align.batch
  cond = {k: jax.numpy.repeat(v[0], rep, axis=0) for k, v in pipe.conds(sampler, 0, 1).items()}
  x = jax.device_put(jax.numpy.zeros((rows,) + tuple(pipe.task.sample_shape)), pipe.batch_sh)
  t = jax.device_put(jax.numpy.full((rows,), mid_t(pipe)), pipe.cond_sharding(1, 0))

  def jvp(p, x, t, c):
    f = lambda y: pipe.task.denoiser(p, cfg.objective.cfg_w)(y, t, c, True)[0]
    return jax.jvp(f, (x,), (x,))
  with jax.set_mesh(pipe.mesh):
    return flops(jax.jit(jvp).lower(pipe.ref_params, x, t, cond).compile()) / 1e9


def mid_t(pipe) -> float:
  """The middle of the schedule's t domain (timestep 500 on VP, 0.5 on the flow)."""
  lo, hi = pipe.schedule.t_range
  return round((lo + hi) / 2) if hi > 1 else (lo + hi) / 2


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
              args_mib=chunk.memory_analysis().argument_size_in_bytes / 2 ** 20,
              temp_mib=chunk.memory_analysis().temp_size_in_bytes / 2 ** 20, compile_s=compile_s)


def config(args, method, k, accum=1, drs="drp", m=4):
  cfg = importlib.import_module(f"configs.{args.backbone}").get_config("tiny")
  cfg.align.grad_accum = accum
  cfg.align.fresh_ta_prompts = False   # the per-update programs measured here take one cond batch
  cfg.method = method
  cfg.objective.weighting = "plain" if method == "distar" else cfg.objective.weighting   # DI*'s own w(t)
  cfg.objective.drs = drs
  cfg.objective.drp_k = k
  cfg.objective.snis_k, cfg.objective.snis_m = k, m
  cfg.objective.snis_variance = "local"    # the real configs' default (tiny uses the table)
  cfg.tiny.width, cfg.tiny.vae_width = args.width, args.vae_width
  cfg.data.resolution = args.resolution
  cfg.align.batch = args.batch
  cfg.model.remat = args.remat
  return cfg


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--backbone", default="sdxl", choices=("sdxl", "sd15", "pixart", "zimage"))
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--vae_width", type=int, default=32)
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--remat", default="full")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--methods", default="di,dipp,distar,didr")
  p.add_argument("--estimators", default="drp:1,drp:2,drp:4,snis:2x4,snis:4x8,hybrid:4x8",
                 help="DIDR rows: drp:K, snis:KxM, hybrid:KxM")
  p.add_argument("--accums", default="1", help="grad_accum values of the 1-device didr K=2 rows")
  p.add_argument("--lora_ranks", default="", help="LoRA ranks of the TA and didr K=2 rows next to "
                 "full fine-tuning (generator and TA adapted)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device dense peak, for MFU")
  args = p.parse_args()
  record = LoadRecord()
  n = jax.device_count()
  rows = []
  base = config(args, "didr", 2)
  pipe = T2I(base)
  nparams = sum(x.size for x in jax.tree.leaves(pipe.ref_params))
  print(f"device: {jax.devices()[0].platform} x {n}; {args.backbone} network {nparams / 1e6:.2f}M "
        f"params, latent {pipe.task.sample_shape}, batch {args.batch}", flush=True)
  rows.append(("ta step", "-", n, 1, measure(pipe, base, "ta_update", args.repeats)))
  for method in filter(None, args.methods.split(",")):
    variants = [("drp", "2")] if method != "didr" else [e.split(":") for e in args.estimators.split(",")]
    for drs, km in variants:
      k, m = (int(v) for v in km.split("x")) if "x" in km else (int(km), 0)
      cfg = config(args, method, k, drs=drs, m=max(m, 2))
      label = f"gen step {method}" + (f" {drs}" if method == "didr" else "")
      rows.append((label, (k if m == 0 else f"{k}x{m}") if method == "didr" else "-", n, 1,
                   measure(pipe, cfg, "gen_update", args.repeats)))
      print(rows[-1], flush=True)
  for r in (int(v) for v in filter(None, args.lora_ranks.split(","))):
    cfg = config(args, "didr", 2)
    cfg.model.lora.rank = r
    adapted = T2I(cfg)
    rows.append((f"ta step lora r={r}", "-", n, 1, measure(adapted, cfg, "ta_update", args.repeats)))
    rows.append((f"gen step didr drp lora r={r}", 2, n, 1, measure(adapted, cfg, "gen_update", args.repeats)))
    print(rows[-2], rows[-1], flush=True)
  one = T2I(base, devices=jax.devices()[:1])
  for m in (int(a) for a in filter(None, args.accums.split(","))):
    rows.append(("gen step didr drp", 2, 1, m, measure(one, config(args, "didr", 2, m), "gen_update",
                                                       args.repeats)))
    print(rows[-1], flush=True)
  didr = {k: r for name, k, d, m, r in rows if name == "gen step didr drp" and d == n}
  # cost_analysis counts a while-loop body once: each row counts one DRP reference call and one
  # microbatch; the K - 1 other calls are added from the standalone DRP call, microbatches x M;
  # a snis row counts its first (shared) step and one chain step: K - 2 more are added
  drp_call = {n: drp_call_gflops(pipe, base)}
  if any(d == 1 for _, _, d, _, _ in rows):
    drp_call[1] = drp_call_gflops(one, base)
  chain = {}
  for name, k, d, m, r in rows:
    extra = 0.0
    if name.startswith("gen step didr drp"):   # full fine-tuning and LoRA: the same reference calls
      extra = (k - 1) * drp_call[d]
    elif name.startswith("gen step didr") and isinstance(k, str):
      kk, mm = (int(v) for v in k.split("x"))
      if kk > 2:
        chain.setdefault(mm, chain_step_gflops(pipe, base, args.batch * mm))
        extra = (kk - 2) * chain[mm]
    r["gflops_all"] = r["gflops"] * m + extra
  print("\none DRP step (guided reference forward + its rematerialised VJP), GFLOPs per device: "
        + ", ".join(f"{v:.2f} on {d} device(s)" for d, v in sorted(drp_call.items())))
  print("\n| step | K | devices | grad_accum | ms/step | GFLOPs (all K steps) | GFLOP/s | peak MiB/device "
        "| args MiB/device | temp MiB/device | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, k, d, m, r in rows:
    g = r["gflops_all"]
    print(f"| {name} | {k} | {d} | {m} | {r['ms']:.0f} | {g:.2f} | {g / r['ms'] * 1e3:.1f} | "
          f"{r['peak_mib']:.1f} | {r['args_mib']:.1f} | {r['temp_mib']:.1f} | {r['compile_s']:.0f} |")
  one_r = {m: r for name, k, d, m, r in rows if name == "gen step didr drp" and d == 1}
  if 1 in didr and 4 in didr:
    print(f"\nremat: peak(K=4) / peak(K=1) = {didr[4]['peak_mib'] / didr[1]['peak_mib']:.2f} (target <= 1.5)")
  if 2 in didr and 1 in one_r:
    print(f"FSDP: args per device {n} dev / 1 dev = {didr[2]['args_mib'] / one_r[1]['args_mib']:.3f} "
          f"(ideal {1 / n:.3f}); peak ratio {didr[2]['peak_mib'] / one_r[1]['peak_mib']:.3f}")
  for m in sorted(one_r):
    if m > 1 and 1 in one_r:
      print(f"grad_accum {m}: 1-device temp (activation) bytes / grad_accum 1 = "
            f"{one_r[m]['temp_mib'] / one_r[1]['temp_mib']:.2f}")
  if args.peak_tflops > 0:
    best = max(r["gflops_all"] / r["ms"] for _, _, d, _, r in rows if d == n) * 1e3
    print(f"MFU (best row, XLA-counted FLOPs incl. remat recompute): {best / 1e3 / args.peak_tflops:.3f} "
          f"of {args.peak_tflops} TFLOP/s per device")
  else:
    print("MFU: not measured (give --peak_tflops, the device's dense peak, on an accelerator)")
  record.done()


if __name__ == "__main__":
  main()
