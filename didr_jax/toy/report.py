"""Toy outputs: results.json, results.md, samples.npz and densities.png (process 0 only)."""
from __future__ import annotations

import json
import os

import numpy as np


def _row(name, m):
  return (f"| {name} | {m['p_pos']:.3f} | {m['w1']:.3f} | {m['kl_hist']:.3f} | "
          f"{m['off_manifold']:.4f} | {m['reward_mean']:.3f} | "
          + " / ".join(f"{s['mass']:.2f}@{s['mean']:.2f}±{s['std']:.2f}" for s in m["mode_stats"])
          + f" | {m.get('wall_s', float('nan')):.0f} |")


def markdown(results: dict) -> str:
  tgt = results["target"]
  lines = [
      "# Toy experiment results", "",
      f"Target p*: P*(x>0) = {tgt['p_pos']:.4f}, mean reward {tgt['reward_mean']:.4f}, modes "
      + " / ".join(f"{s['mass']:.3f}@{s['mean']:.2f}±{s['std']:.2f}" for s in tgt["mode_stats"]), "",
      "| method | p_pos | W1 | KL(hist) | off-manifold | reward | modes (mass@mean±std) | wall s |",
      "|---|---|---|---|---|---|---|---|"]
  for name in ("reference", "generator_init"):
    if name in results:
      lines.append(_row(name, results[name]))
  for name, m in results["methods"].items():
    lines.append(_row(name, m))
  walls = [f"{label} {results[key]:.0f} s" for key, label in
           (("pretraining_wall_s", "pre-training"), ("alignment_wall_s", "alignment, all methods"))
           if key in results]
  if walls:
    lines += ["", "Wall time: " + "; ".join(walls) + " (a method's own wall overlaps the others' "
              "when train.parallel_methods > 1)."]
  return "\n".join(lines) + "\n"


def densities_png(path: str, problem, samples: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  g = problem.grid(4001)
  names = list(samples)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True)
  axes = np.atleast_1d(axes)
  for ax, name in zip(axes, names):
    ax.hist(np.asarray(samples[name])[:, 0], bins=120, range=(g[0], g[-1]), density=True,
            color="tab:blue", alpha=0.6)
    ax.plot(g, problem.target_marginal(g), "k-", lw=1.2, label="p*")
    ax.plot(g, problem.q0_marginal(g), "r--", lw=1.0, label="q0")
    ax.set_title(name)
    ax.set_xlim(g[0] / 2, g[-1] / 2)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def write_all(workdir: str, problem, results: dict, samples: dict) -> None:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results))
  np.savez(os.path.join(workdir, "samples.npz"), **{k: np.asarray(v) for k, v in samples.items()})
  densities_png(os.path.join(workdir, "densities.png"), problem, samples)
