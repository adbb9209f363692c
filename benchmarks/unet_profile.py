"""Where the UNet's forward+backward spends its time, per op class: our jitted program (XLA:CPU)
against diffusers PyTorch eager, same weights and inputs as ``benchmarks/unet.py``.

  PYTHONPATH=. python benchmarks/unet_profile.py [--batch=4] [--size=32] [--iters=3]

XLA side: ``jax.profiler`` records one event per executed thunk (a fusion, a convolution, a dot,
a copy) on the executor and the intra-op worker threads; each thunk is classed by the HLO ops it
contains (compiled ``as_text``): convolution, dot (linear layers, attention products), reduce
(group/layer norm statistics, softmax, the loss), layout (transpose / copy only), convert (dtype
casts only), elementwise (the rest). Torch side: ``torch.profiler`` self CPU time per aten op,
classed by name the same way. Both are CPU time summed over threads, per iteration (so a class that
runs on two threads at once counts twice); the wall time per iteration is printed beside them.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402
from benchmarks.unet import build  # noqa: E402  (imports torch the way the tests do)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

CLASSES = ("convolution", "dot", "reduce", "layout", "convert", "elementwise")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
SOURCES = {}      # instruction name -> the jax op it came from (HLO metadata), for the top-thunk list


def hlo_classes(hlo_text: str) -> dict[str, str]:
  """{instruction name: class} for every instruction of every computation; a fusion (or call) is
  classed by the ops of the computation it calls, the dearest kind first."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = computations.setdefault(head.group(1), [])
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      call = _CALLS.search(line)
      current.append((m.group(1).lstrip("%"), m.group(2), call.group(1) if call else None))
      source = _OP_NAME.search(line)
      if source:
        SOURCES[m.group(1).lstrip("%")] = source.group(1)

  def ops_of(comp, seen=()):
    out = set()
    for _, op, callee in computations.get(comp, []):
      out.add(op)
      if callee and callee not in seen:
        out |= ops_of(callee, seen + (callee,))
    return out

  def classify(ops):
    if "convolution" in ops:
      return "convolution"
    if "dot" in ops:
      return "dot"
    if "reduce" in ops or "reduce-window" in ops:
      return "reduce"
    data = ops - {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "broadcast", "reshape"}
    if data and data <= {"transpose", "copy", "slice", "concatenate", "pad", "dynamic-slice",
                         "dynamic-update-slice"}:
      return "layout"
    if data and data <= {"convert", "copy"}:
      return "convert"
    return "elementwise"

  out = {}
  for comp in computations.values():
    for name, op, callee in comp:
      out[name] = classify(ops_of(callee) if callee else {op})
  return out


def xla_profile(compiled, run, iters: int) -> tuple[dict, float]:
  """({class: CPU ms per iteration}, wall s per iteration) of ``run()`` under jax.profiler."""
  names = hlo_classes(compiled.as_text())
  run()
  folder = tempfile.mkdtemp(prefix="unet_prof_")
  t0 = time.perf_counter()
  with jax.profiler.trace(folder):
    for _ in range(iters):
      run()
  wall = (time.perf_counter() - t0) / iters
  path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
  totals, unmatched, per_thunk = collections.Counter(), collections.Counter(), collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        base = ev.name.split(":")[0]
        if base in names:
          totals[names[base]] += ev.duration_ns / 1e6 / iters
          per_thunk[base] += ev.duration_ns / 1e6 / iters
        else:
          unmatched[base] += ev.duration_ns / 1e6 / iters
  top = ", ".join(f"{k} {v:.0f} ms" for k, v in unmatched.most_common(3))
  print(f"XLA events not named after an HLO instruction (executor wrappers; not counted): {top}")
  for cls in CLASSES:
    thunks = [(k, v) for k, v in per_thunk.most_common() if names[k] == cls][:3]
    if thunks:
      print(f"  top {cls} thunks: " + "; ".join(f"{k} {v:.0f} ms ({SOURCES.get(k, '?')[-70:]})"
                                                  for k, v in thunks))
  return dict(totals), wall


TORCH_CLASSES = (
    ("convolution", ("conv", "convolution")),
    ("dot", ("mm", "bmm", "addmm", "matmul", "linear", "baddbmm", "_scaled_dot_product")),
    ("reduce", ("group_norm", "layer_norm", "softmax", "sum", "mean", "var", "norm")),
    ("layout", ("copy_", "clone", "contiguous", "permute", "transpose", "cat", "_to_copy", "t",
                "view", "reshape", "expand", "as_strided", "upsample", "slice", "chunk", "split")),
)


def torch_class(op: str) -> str:
  name = op.removeprefix("aten::")
  for cls, keys in TORCH_CLASSES:
    if any(name == k or name.startswith(k + "_") or name.startswith("native_" + k) or
           (k in name and cls in ("convolution", "reduce")) for k in keys):
      return cls
  return "elementwise"


def torch_profile(step, iters: int) -> tuple[dict, float]:
  step()
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(iters):
      step()
  wall = (time.perf_counter() - t0) / iters
  totals = collections.Counter()
  for ev in prof.key_averages():
    if ev.key.startswith("aten::"):
      totals[torch_class(ev.key)] += ev.self_cpu_time_total / 1e3 / iters
  return dict(totals), wall


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--iters", type=int, default=3)
  args = p.parse_args()
  record = LoadRecord(None)
  torch.set_num_threads(os.cpu_count())
  tm, graphdef, params, arrays = build(args.batch, args.size)
  inputs = [jnp.asarray(a) for a in arrays]

  def loss(params, x, t, ctx, pooled, time_ids, w):
    out = nnx.merge(graphdef, params)(x, t, ctx, text_embeds=pooled, time_ids=time_ids)
    return jnp.sum(out * w)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, *inputs).compile()
  ours, ours_wall = xla_profile(compiled, lambda: jax.block_until_ready(compiled(params, *inputs)),
                                args.iters)
  x, t, ctx, pooled, time_ids, w = arrays
  tx, tw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(0, 3, 1, 2).copy())
  added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
  tt, tctx = torch.from_numpy(t), torch.from_numpy(ctx)

  def torch_step():
    tm.zero_grad(set_to_none=True)
    (tm(tx, tt, tctx, added_cond_kwargs=added).sample * tw).sum().backward()

  ref, ref_wall = torch_profile(torch_step, args.iters)
  print(f"UNet forward+backward, batch {args.batch}, {args.size}x{args.size} latents; "
        f"{os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}")
  print(f"wall per iteration under the profilers: ours {ours_wall:.3f} s, torch {ref_wall:.3f} s")
  print("| op class | ours CPU ms | ours % | torch CPU ms | torch % |")
  print("|---|---|---|---|---|")
  so, st = sum(ours.values()), sum(ref.values())
  for cls in CLASSES:
    a, b = ours.get(cls, 0.0), ref.get(cls, 0.0)
    print(f"| {cls} | {a:.0f} | {100 * a / so:.0f} | {b:.0f} | {100 * b / st:.0f} |")
  print(f"| total | {so:.0f} | 100 | {st:.0f} | 100 |")
  record.done()


if __name__ == "__main__":
  main()
