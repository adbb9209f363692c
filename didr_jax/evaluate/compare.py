"""Several evaluations side by side: a table of every metric and a Pareto plot of two.

  python -m didr_jax.evaluate.compare EVAL_DIR [EVAL_DIR ...] --x=fid --y=pickscore [--out=DIR]

Each EVAL_DIR is an ``evaluate`` output (results.json), labelled by its folder name. A run is
dominated when another is at least as good on both --x and --y and better on one (FID: lower is
better; every other metric: higher). Writes ``compare.md`` and ``pareto.png`` (default: the
current folder); dominated runs are listed in the table and drawn hollow.
"""
from __future__ import annotations

import json
import os

from absl import flags

from didr_jax import cli, log
from didr_jax.errors import ConfigError
from didr_jax.evaluate.metrics import LOWER_IS_BETTER
from didr_jax.evaluate.protocols import headline
from didr_jax.metrics.pareto import dominated_by

_X = flags.DEFINE_string("x", None, "Metric on the x axis.")
_Y = flags.DEFINE_string("y", None, "Metric on the y axis.")
_OUT = flags.DEFINE_string("out", ".", "Output folder.")


def load_results(folders) -> dict:
  """{label: results.json} of each evaluation folder."""
  out = {}
  for folder in folders:
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
      raise ConfigError(f"{folder}: no results.json (an output folder of python -m didr_jax.evaluate)")
    label = os.path.basename(os.path.normpath(folder))
    if label in out:
      raise ConfigError(f"{folder}: two evaluations are named {label!r}; give them distinct folder names")
    with open(path) as f:
      out[label] = json.load(f)
  return out


def compare(results: dict, x: str, y: str) -> dict:
  """{"points": {label: (x, y)}, "dominated_by": {label: [labels]}, "table": {label: {metric: value}}}."""
  for label, r in results.items():
    for m in (x, y):
      if m not in r["metrics"]:
        raise ConfigError(f"--{'x' if m == x else 'y'}={m}: evaluation {label!r} has no {m} "
                          f"(it has {sorted(r['metrics'])})")
  points = {k: (headline(r["metrics"][x]), headline(r["metrics"][y])) for k, r in results.items()}
  maximize = (x not in LOWER_IS_BETTER, y not in LOWER_IS_BETTER)
  table = {k: {m: headline(e) for m, e in r["metrics"].items()} for k, r in results.items()}
  return {"points": points, "dominated_by": dominated_by(points, maximize), "table": table,
          "x": x, "y": y}


def markdown(cmp: dict) -> str:
  metrics = sorted({m for row in cmp["table"].values() for m in row})
  lines = ["| run | " + " | ".join(metrics) + " | dominated by |", "|---" * (len(metrics) + 2) + "|"]
  for k, row in cmp["table"].items():
    cells = [f"{row[m]:.4g}" if m in row else "" for m in metrics]
    lines.append(f"| {k} | " + " | ".join(cells) + f" | {', '.join(cmp['dominated_by'][k]) or '-'} |")
  return "\n".join(lines) + "\n"


def plot(path: str, cmp: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 4))
  for k, (px, py) in cmp["points"].items():
    dominated = bool(cmp["dominated_by"][k])
    ax.scatter([px], [py], s=40, facecolors="none" if dominated else "C0", edgecolors="C0")
    ax.annotate(k, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
  front = sorted((p for k, p in cmp["points"].items() if not cmp["dominated_by"][k]))
  ax.plot([p[0] for p in front], [p[1] for p in front], "C0-", lw=1)
  ax.set_xlabel(cmp["x"] + (" (lower is better)" if cmp["x"] in LOWER_IS_BETTER else ""))
  ax.set_ylabel(cmp["y"] + (" (lower is better)" if cmp["y"] in LOWER_IS_BETTER else ""))
  ax.set_title("filled: Pareto front; hollow: dominated")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  folders = argv[1:]
  if not folders:
    raise ConfigError("give one or more evaluation folders")
  if not _X.value or not _Y.value:
    raise ConfigError("--x and --y: required (metric names, e.g. --x=fid --y=pickscore)")
  cmp = compare(load_results(folders), _X.value, _Y.value)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "compare.md"), "w") as f:
    f.write(markdown(cmp))
  plot(os.path.join(_OUT.value, "pareto.png"), cmp)
  log.info("%s", markdown(cmp))
  log.info("wrote %s and %s", os.path.join(_OUT.value, "compare.md"), os.path.join(_OUT.value, "pareto.png"))
  return 0


if __name__ == "__main__":
  cli.run(main)
