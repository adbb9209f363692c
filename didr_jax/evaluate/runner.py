"""One evaluation: read the sampled images, score them, aggregate by the protocol, write
``scores.csv``, ``results.json`` and ``results.md``."""
from __future__ import annotations

import csv
import json
import os
import platform

import numpy as np

from didr_jax import log
from didr_jax.evaluate import images as imgs
from didr_jax.evaluate import metrics as mt
from didr_jax.evaluate import protocols as pr


def image_sets(images_dir: str, protocol: str) -> dict:
  """{label: folder}: the four style folders for hpsv2.1, else the folder itself."""
  if protocol == "hpsv2.1":
    return {s: os.path.join(images_dir, s) for s in pr.HPS_STYLES}
  return {"": images_dir}


def check_inputs(images_dir: str, protocol: str, specs, prompts_file: str | None) -> dict:
  """Everything but the models, before any is loaded: {label: index rows}."""
  pr.check(protocol, [s.name for s in specs], prompts_file)
  rows = {label: imgs.read_index(folder) for label, folder in image_sets(images_dir, protocol).items()}
  if protocol == "parti":
    pr.parti_groups(prompts_file, rows[""])
  return rows


def _versions() -> dict:
  import jax
  import PIL
  return {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
          "pillow": PIL.__version__}


def _model_of(folder: str):
  path = os.path.join(folder, "sample.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def evaluate(images_dir: str, specs, protocol: str, out: str, *, batch: int = 16,
             prompts_file: str | None = None) -> dict:
  rows_by_set = check_inputs(images_dir, protocol, specs, prompts_file)
  folders = image_sets(images_dir, protocol)
  rows, files, styles, images = [], [], [], []
  for label, set_rows in rows_by_set.items():
    rows += set_rows
    files += [os.path.join(label, r["file"]) if label else r["file"] for r in set_rows]
    styles += [label] * len(set_rows)
    images += imgs.load_images(folders[label], set_rows)
  prompts = [r["prompt"] for r in rows]
  scores, set_values = {}, {}
  for spec in specs:
    metric = mt.load(spec)
    log.info("scoring %d images with %s (%s)", len(images), spec.name, spec.path)
    if spec.name == "fid":
      set_values["fid"] = metric(images, batch)
    elif spec.name == "diversity":
      keys = [f"{s}/{r['prompt_index']}" for s, r in zip(styles, rows)]
      set_values["diversity"] = metric(images, keys, batch)
    else:
      scores[spec.name] = metric(images, prompts, batch)
  groups = pr.parti_groups(prompts_file, rows) if protocol == "parti" else None
  summary = pr.summarize(protocol, scores, set_values, styles=styles, groups=groups)
  result = {"protocol": protocol, "images": images_dir, "count": len(rows), **summary,
            "specs": [{"name": s.name, "path": os.path.abspath(s.path), "options": s.options} for s in specs],
            "models": {label or "all": _model_of(f) for label, f in folders.items()},
            "versions": _versions()}
  write(out, files, prompts, scores, result)
  return result


def write(out: str, files, prompts, scores: dict, result: dict) -> None:
  os.makedirs(out, exist_ok=True)
  names = list(scores)
  with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "prompt", *names])
    for i, (file, prompt) in enumerate(zip(files, prompts)):
      w.writerow([file, prompt, *(repr(float(scores[n][i])) for n in names)])
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(result))


def _fmt(entry: dict) -> str:
  if "value" in entry:
    return f"{entry['value']:.4g}"
  return f"{entry['mean']:.4g} ± {entry['std']:.3g}"


def markdown(result: dict) -> str:
  lines = [f"# Evaluation ({result['protocol']}, {result['count']} images)", "",
           "| metric | value |", "|---|---|"]
  lines += [f"| {name} | {_fmt(e)} |" for name, e in result["metrics"].items()]
  if "hpsv2.1" in result["metrics"] and "styles" in result["metrics"]["hpsv2.1"]:
    lines += ["", "HPSv2.1 benchmark (100 x cosine; mean ± std of 10 chunk means):", "",
              "| style | score |", "|---|---|"]
    lines += [f"| {s} | {e['mean']:.2f} ± {e['std']:.4f} |"
              for s, e in result["metrics"]["hpsv2.1"]["styles"].items()]
    lines.append(f"| average | {result['metrics']['hpsv2.1']['mean']:.2f} |")
  for key in ("per_category", "per_challenge", "per_style"):
    if key in result:
      names = list(next(iter(result[key].values())))
      lines += ["", f"{key.replace('_', ' ')}:", "", "| group | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|"]
      lines += [f"| {g} | " + " | ".join(_fmt(e[n]) for n in names) + " |" for g, e in result[key].items()]
  return "\n".join(lines) + "\n"
