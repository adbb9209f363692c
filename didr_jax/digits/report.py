"""Digits outputs: results.md, pareto.png, per-run sample grids, samples.npz (process 0 only).

Pareto analysis uses the held-out reward (higher is better) against the Frechet distance (lower
is better): a run is dominated when another aligned run is at least as good on both and better on
one. ``equal_reward_fd`` compares methods at equal held-out reward: for each point of a method,
the FD of another method's front linearly interpolated at that reward (None outside its range).
"""
from __future__ import annotations

import json
import os

import numpy as np

from didr_jax.metrics import pareto

METHOD_ORDER = ("di", "dipp", "distar", "didr")
COLUMNS = (("reward", "reward"), ("held-out reward", "heldout_reward"), ("acc", "reward_accuracy"),
           ("held-out acc", "heldout_accuracy"), ("FD", "fd"), ("FD/class", "fd_class_mean"),
           ("precision", "precision"), ("recall", "recall"), ("diversity", "diversity"),
           ("off-manifold", "off_manifold"))


def dominated_by(points: dict) -> dict:
  """{run: [runs that dominate it]} for points {run: (heldout_reward, fd)}."""
  return pareto.dominated_by(points, maximize=(True, False))


def front(points: dict) -> list:
  """The non-dominated runs of ``points``, by increasing held-out reward."""
  dom = dominated_by(points)
  return sorted((k for k in points if not dom[k]), key=lambda k: points[k][0])


def fd_on_front_at(points: dict, runs: list, reward: float):
  """FD of the piecewise-linear front through ``runs`` at held-out ``reward`` (None outside)."""
  pts = sorted((points[r] for r in runs), key=lambda p: p[0])
  rs = [p[0] for p in pts]
  if not pts or reward < rs[0] or reward > rs[-1]:
    return None
  return float(np.interp(reward, rs, [p[1] for p in pts]))


def pareto_analysis(runs: dict) -> dict:
  aligned = {k: v for k, v in runs.items() if v["method"] in METHOD_ORDER}
  points = {k: (v["heldout_reward"], v["fd"]) for k, v in aligned.items()}
  groups = {}
  for k, v in aligned.items():
    groups.setdefault(v["label"], []).append(k)
  fronts = {g: front({k: points[k] for k in ks}) for g, ks in groups.items()}
  equal = {}
  for g, ks in groups.items():
    for other, other_front in fronts.items():
      if other == g:
        continue
      for k in ks:
        fd_other = fd_on_front_at(points, other_front, points[k][0])
        equal.setdefault(k, {})[other] = fd_other
  return {"dominated_by": dominated_by(points), "global_front": front(points), "method_fronts": fronts,
          "equal_reward_fd": equal}


def _fmt(v):
  return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
  runs = results["runs"]
  lines = ["# Digits experiment results", "",
           f"variant `{results['variant']}`; {results['data']['n_train']} train / "
           f"{results['data']['n_test']} test images at {results['data']['resolution']}x"
           f"{results['data']['resolution']}; samples per run {results['data']['n_eval']} (the test "
           "labels); reward = log p_clf(label | x) of the training classifier, held-out reward = the "
           "same under the held-out classifier; FD in the feature network's space vs the real test "
           "images.", "",
           "Classifier test accuracy: " + ", ".join(
               f"{k} {v['test_accuracy']:.3f}" for k, v in results["classifiers"].items()), "",
           "| run | method | scale | " + " | ".join(c for c, _ in COLUMNS) + " | dominated | wall s |",
           "|---" * (len(COLUMNS) + 5) + "|"]
  dom = results["pareto"]["dominated_by"]
  for name, m in list(results["baselines"].items()) + list(runs.items()):
    scale = m.get("scale")
    row = [name, m.get("label", "-"), "-" if scale is None else f"{m['param']}={scale:g}"]
    row += [_fmt(m.get(key)) for _, key in COLUMNS]
    row += [("yes" if dom.get(name) else "no") if name in dom else "-", _fmt(m.get("wall_s"))]
    lines.append("| " + " | ".join(row) + " |")
  p = results["pareto"]
  lines += ["", f"Global Pareto front (held-out reward vs FD): {', '.join(p['global_front'])}", ""]
  for g, f in p["method_fronts"].items():
    lines.append(f"* front of {g}: {', '.join(f)}")
  lines += ["", "FD of another method's front at the same held-out reward (interpolated; '-' outside "
            "its reward range):", "", "| run | " + " | ".join(p["method_fronts"]) + " |",
            "|---" * (len(p["method_fronts"]) + 1) + "|"]
  for name in runs:
    if name in p["equal_reward_fd"]:
      lines.append(f"| {name} (FD {runs[name]['fd']:.3f}) | " + " | ".join(
          _fmt(p["equal_reward_fd"][name].get(g)) for g in p["method_fronts"]) + " |")
  if results.get("paired"):
    lines += ["", "DIDR minus DI++ / DI*, run by run, on the same noise and labels (paired bootstrap, "
              "+- one standard deviation): dFD < 0 and d held-out > 0 favour DIDR.", "",
              "| pair | dFD | d held-out reward |", "|---|---|---|"]
    lines += [f"| {k} | {v['d_fd']:+.2f} +- {v['sd_fd']:.2f} | {v['d_heldout']:+.4f} +- {v['sd_heldout']:.4f} |"
              for k, v in results["paired"].items()]
  tb = {n: m["trainer_tbins"] for n, m in runs.items() if m.get("trainer_tbins")}
  if tb:
    keys = sorted({k for v in tb.values() for k in v})
    lines += ["", "Per-t-bin metrics the trainer logged (mean over the run's logged chunks):", "",
              "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_fmt(v.get(k)) for k in keys) + " |" for n, v in tb.items()]
  drs = results.get("drs_check")
  if drs:
    e = drs["t_edges"]
    bins = [f"{e[i]:.0f}-{e[i + 1]:.0f}" for i in range(len(e) - 1)]
    lines += ["", f"DRS check at x_t = a x0 + s eps (x0 real test, {drs['states_per_bin']} states per bin): "
              f"each estimator's shift (s^2/a) DRS, as the trainer computes it, against a jackknifed "
              f"posterior-sample reference from {drs['chains']} chains of {drs['chain_steps']} steps of "
              f"the guided reference:", "",
              "| estimator | beta | t-bin | mean norm of shift | mean norm of MC shift | projection ratio | "
              "rel. error | cosine | MC half-split |", "|---|---|---|---|---|---|---|---|---|"]
    for est, per_beta in drs["estimators"].items():
      for beta, d in per_beta.items():
        for i, b in enumerate(bins):
          lines.append(f"| {est} | {beta} | {b} | {d['shift_norm'][i]:.3f} | {d['mc_shift_norm'][i]:.3f} | "
                       f"{_ratio(d['projection_ratio'][i], d['projection_ratio_sd'][i])} | {d['rel_error'][i]:.2f} | {d['cosine'][i]:.2f} | "
                       f"{d['mc_half_split'][i]:.2f} |")
    lines += ["", "projection ratio = sum <T_est, T_MC> / sum <T_a, T_b> (T_a, T_b: the reference from two "
              "independent halves of the chains; +- its bootstrap sd over states; n/r: the reference does not resolve the shift in that bin): 1 = unbiased; rel. error = mean |T_est - T_MC| / mean "
              "|T_MC| (includes the estimator's own noise); MC half-split = mean |T_a - T_b| / mean |T_MC| "
              "(the reference's own noise scale)."]
  if results.get("stage_wall_s"):
    lines += ["", "Wall time per stage (s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in results["stage_wall_s"].items()),
              f"Total {results['total_wall_s']:.0f} s on {results['machine']['cpus']} CPUs; load average "
              f"(1, 5, 15 min) at the start {results['machine']['load_average_at_start']}, at the end "
              f"{results['machine']['load_average']}"]
  return "\n".join(lines) + "\n"


def _ratio(value, sd) -> str:
  return "n/r" if value is None else f"{value:.2f} +- {sd:.2f}"


def pareto_png(path: str, results: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  runs, dom = results["runs"], results["pareto"]["dominated_by"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colors = {}
  for ax, key, title in ((axes[0], "heldout_reward", "held-out reward"), (axes[1], "reward", "training reward")):
    groups = {}
    for name, m in runs.items():
      groups.setdefault(m["label"], []).append(name)
    for i, (g, names) in enumerate(groups.items()):
      color = colors.setdefault(g, f"C{i}")
      names = sorted(names, key=lambda n: runs[n][key])
      if runs[names[0]]["method"] in METHOD_ORDER:
        front = results["pareto"]["method_fronts"].get(g, [])
        fr = sorted(front, key=lambda n: runs[n][key])
        ax.plot([runs[n]["fd"] for n in fr], [runs[n][key] for n in fr], "-", color=color, alpha=0.6)
      for n in names:
        hollow = bool(dom.get(n))
        ax.scatter(runs[n]["fd"], runs[n][key], s=40, marker="o" if runs[n]["method"] in METHOD_ORDER else "s",
                   facecolors="none" if hollow else color, edgecolors=color,
                   label=g if n == names[0] else None)
        if runs[n].get("scale") is not None:
          ax.annotate(f"{runs[n]['scale']:g}", (runs[n]["fd"], runs[n][key]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator([10, 20, 30, 50, 100, 200, 500, 1000]))
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("Frechet distance to real test, log scale (lower is better)")
    ax.set_ylabel(f"{title}: mean log p(label | x)")
    ax.set_title(f"{title} vs FD")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("lines: each method's Pareto front (held-out reward vs FD); hollow: dominated by "
               "another aligned run; squares: reference and initial generator", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def sample_grid(path: str, images: np.ndarray, labels: np.ndarray, per_class: int, zoom: int = 4):
  """Rows = classes 0..9, ``per_class`` samples each (the first of each label), nearest-upscaled."""
  from PIL import Image
  h = images.shape[1]
  grid = np.full((10 * (h + 1) * zoom, per_class * (h + 1) * zoom), 0, np.uint8)
  for c in range(10):
    idx = np.flatnonzero(labels == c)[:per_class]
    for j, i in enumerate(idx):
      px = np.clip((images[i] + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
      px = np.kron(px, np.ones((zoom, zoom), np.uint8))
      r0, c0 = c * (h + 1) * zoom, j * (h + 1) * zoom
      grid[r0:r0 + h * zoom, c0:c0 + h * zoom] = px
  Image.fromarray(grid).save(path)


def write_all(workdir: str, results: dict, samples: dict, per_class: int) -> None:
  """``samples``: {run: (images [N, 8, 8] in [-1, 1], labels [N])} including ``real_test``."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results))
  flat = {}
  for name, (images, labels) in samples.items():
    flat[f"{name}/images"] = np.asarray(images, np.float32)
    flat[f"{name}/labels"] = np.asarray(labels, np.int32)
  np.savez(os.path.join(workdir, "samples.npz"), **flat)
  os.makedirs(os.path.join(workdir, "grids"), exist_ok=True)
  for name, (images, labels) in samples.items():
    sample_grid(os.path.join(workdir, "grids", f"{name}.png"), np.asarray(images), np.asarray(labels),
                per_class)
  pareto_png(os.path.join(workdir, "pareto.png"), results)
