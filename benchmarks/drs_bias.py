"""Exact-reference bias of every DRS estimator on the toy priors, and DIDR's fixed point with each.

  python benchmarks/drs_bias.py                  # 1-D default toy: tables + fixed points (~10 min)
  python benchmarks/drs_bias.py --ring           # also the 2-D ring of 8 modes (bias tables)
  python benchmarks/drs_bias.py --quick          # fewer estimators and repeats

No network is trained: the reference is the closed-form mixture posterior, so every number is the
estimator's own error (docs/method.md section 4). Prints Markdown tables; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from didr_jax.diffusion import make_schedule  # noqa: E402
from didr_jax.objectives import ObjectiveConfig  # noqa: E402
from didr_jax.toy import drs_bias  # noqa: E402
from didr_jax.toy.problem import ToyProblem, target_summary  # noqa: E402

T_RANGE = (0.02, 0.98)
SCHEDULE = dict(kind="continuous_vp", betas="linear", beta_min=0.1, beta_max=20.0)


def problem_of(means, stds, weights, reward="sigmoid", beta=0.5, tau=0.25):
  return ToyProblem.from_config(config_dict.ConfigDict(dict(
      means=means, stds=stds, weights=weights, tau=tau, beta=beta, reward=reward)))


def ring(n=8, radius=2.0, std=0.3):
  means = tuple((radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n))
                for i in range(n))
  return problem_of(means, (std,) * n, (1.0 / n,) * n)


ESTIMATORS = {
    "drp K=1": dict(drs="drp", drp_k=1), "drp K=2": dict(drs="drp", drp_k=2),
    "drp K=8": dict(drs="drp", drp_k=8),
    "snis K=4 M=8 local (default)": dict(drs="snis", snis_k=4, snis_m=8, snis_variance="local"),
    "snis K=8 M=8 local": dict(drs="snis", snis_k=8, snis_m=8, snis_variance="local"),
    "snis K=2 M=8 local": dict(drs="snis", snis_k=2, snis_m=8, snis_variance="local"),
    "snis K=4 M=4 local": dict(drs="snis", snis_k=4, snis_m=4, snis_variance="local"),
    "snis K=4 M=8 table": dict(drs="snis", snis_k=4, snis_m=8, snis_variance="table"),
    "snis K=8 M=8 table": dict(drs="snis", snis_k=8, snis_m=8, snis_variance="table"),
    "snis K=4 M=8 none": dict(drs="snis", snis_k=4, snis_m=8, snis_variance="none"),
    "hybrid K=4 M=8 local, SNR 0.66": dict(drs="hybrid", snis_k=4, snis_m=8, snis_variance="local"),
}
QUICK = ("drp K=1", "drp K=2", "snis K=4 M=8 local (default)", "snis K=4 M=8 table",
         "hybrid K=4 M=8 local, SNR 0.66")


def row(name, res):
  r = " | ".join(f"{v:.2f}" for v in res["ratio"])
  return f"| {name} | {r} | {res['integrated_bias']:+.3f} | {max(res['rel_std']):.2f} |"


def bias_tables(problem, schedule, table, names, key, label):
  edges = np.linspace(*T_RANGE, 11)
  head = " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges[:-1], edges[1:]))
  out = {}
  for weighting in ("q", "p*"):
    print(f"\n{label}: E[T_est] / E[T_exact] per t-bin, x_t ~ {weighting}_t\n")
    print(f"| estimator | {head} | integrated bias | max rel. std |")
    print("|---|" + "---|" * 12)
    for name in names:
      obj = ObjectiveConfig(method="didr", beta=problem.beta, **ESTIMATORS[name])
      res = drs_bias.bias_per_bin(obj, problem, schedule, table, key, t_range=T_RANGE,
                                  weighting="q" if weighting == "q" else "p")
      out[f"{name} / {weighting}"] = res
      print(row(name, res), flush=True)
  return out


def fixed_points(problem, schedule, table, names, key, repeats):
  p_star = target_summary(problem, num_is=1000)["p_pos"]
  print(f"\nDIDR fixed point (exact reference and TA, flexible generator; P*(x>0) = {p_star:.3f})\n")
  print("| DRS source | P(x>0) | W1 | max x |")
  print("|---|---|---|---|")
  out = {}
  for name in ["exact"] + list(names):
    kw = dict(drs="exact") if name == "exact" else ESTIMATORS[name]
    obj = ObjectiveConfig(method="didr", beta=problem.beta, **kw)
    drp = obj.drs == "drp"
    x = drs_bias.fixed_point(obj, problem, schedule, table, key, t_range=T_RANGE,
                             iterations=1000 if drp else 300, lr=1.0 if drp else 2.0,
                             x_lim=16.0 if drp else 8.0, num_x=641 if drp else 321,
                             num_t=24 if drp else 16, repeats=repeats)
    res = drs_bias.particle_summary(problem, x)
    out[name] = res
    print(f"| {name} | {res['p_pos']:.3f} | {res['w1']:.3f} | {res['max']:.2f} |", flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--ring", action="store_true")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--reward", default="sigmoid", choices=("sigmoid", "step"))
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  t0 = time.time()
  key = jax.random.PRNGKey(0)
  schedule = make_schedule(SCHEDULE)
  names = QUICK if args.quick else tuple(ESTIMATORS)
  results = {}
  toy = problem_of(((-2.0,), (2.0,)), (0.5, 0.5), (0.5, 0.5), reward=args.reward)
  if args.reward == "step":   # the DRP needs a reward gradient
    names = tuple(n for n in names if not n.startswith(("drp", "hybrid")))
  table = drs_bias.exact_table(toy, schedule, key)
  results["1d"] = bias_tables(toy, schedule, table, names, key, f"1-D toy ({args.reward} reward)")
  results["1d_fixed_point"] = fixed_points(toy, schedule, table, names, key,
                                           64 if args.quick else 256)
  if args.ring:
    rp = ring()
    ring_names = tuple(n for n in names if not n.startswith("drp K=8"))
    results["ring"] = bias_tables(rp, schedule, drs_bias.exact_table(rp, schedule, key), ring_names,
                                  key, "2-D ring of 8 modes (radius 2, std 0.3), reward on x[0]")
  print(f"\nwall {time.time() - t0:.0f}s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  record = LoadRecord()
  main()
  record.done()
