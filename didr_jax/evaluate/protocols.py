"""Evaluation protocols: which images, which metrics, how per-image scores become a table.

* ``plain``: any prompt set; mean and std (ddof 0) of every metric over all images;
* ``hpsv2.1``: HPSv2's benchmark with the v2.1 model: ``--images`` holds one sampled folder per
  style (anime, concept-art, paintings, photo; one image per prompt, in the prompt files' order);
  per style the scores (100 x cosine) are cut into 10 consecutive chunks (80 images each for the
  benchmark's 800 prompts), the style's score is the mean of the chunk means with their std, and
  the benchmark's score is the average of the four style scores (HPSv2's ``evaluate.py``);
* ``parti``: PartiPrompts (``--prompts`` = the TSV that was sampled): every metric's mean and std
  overall, per Category and per Challenge;
* ``coco``: COCO captions: FID against the real images' statistics (``fid`` metric) and CLIPScore
  (``clipscore`` metric, ViT-B/32 in the literature), plus any other metric given.
"""
from __future__ import annotations

import numpy as np

from didr_jax.errors import ConfigError

PROTOCOLS = ("plain", "hpsv2.1", "parti", "coco")
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
HPS_CHUNKS = 10
NEEDS = {"hpsv2.1": ("hpsv2.1",), "coco": ("fid", "clipscore")}


def check(protocol: str, metric_names, prompts_file: str | None) -> None:
  """Protocol name, the metrics it needs and its inputs, before any model is loaded."""
  if protocol not in PROTOCOLS:
    raise ConfigError(f"--protocol: {protocol!r} unknown; choose one of {PROTOCOLS}")
  missing = [m for m in NEEDS.get(protocol, ()) if m not in metric_names]
  if missing:
    raise ConfigError(f"--protocol={protocol}: needs the metric(s) {missing} in --metrics")
  if protocol == "parti" and not prompts_file:
    raise ConfigError("--protocol=parti: needs --prompts=PartiPrompts.tsv (its Category and Challenge columns)")


def stats(x) -> dict:
  x = np.asarray(x, np.float64)
  return {"mean": float(x.mean()), "std": float(x.std()), "count": int(x.size)}


def hps_benchmark(scores_by_style: dict) -> dict:
  """{"mean": average of the style scores, "styles": {style: {"mean", "std", "chunk_means"}}}."""
  styles = {}
  for style, scores in scores_by_style.items():
    s = np.asarray(scores, np.float64)
    if s.size % HPS_CHUNKS:
      raise ConfigError(f"--protocol=hpsv2.1: style {style!r} has {s.size} images; the benchmark "
                        f"cuts each style into {HPS_CHUNKS} equal chunks (800 prompts: 80 each)")
    chunk_means = s.reshape(HPS_CHUNKS, -1).mean(axis=1)
    styles[style] = {"mean": float(chunk_means.mean()), "std": float(chunk_means.std()),
                     "chunk_means": [float(c) for c in chunk_means]}
  return {"mean": float(np.mean([v["mean"] for v in styles.values()])), "styles": styles}


def parti_groups(prompts_file: str, rows: list[dict]) -> dict:
  """{"category": [...], "challenge": [...]} per image, from the TSV row of its prompt index."""
  from didr_jax.data import load_prompts
  cols = {k: load_prompts(prompts_file, format="tsv", field=k) for k in ("Prompt", "Category", "Challenge")}
  if len({len(v) for v in cols.values()}) != 1:
    raise ConfigError(f"--prompts: {prompts_file}: the Prompt, Category and Challenge columns differ in length")
  out = {"category": [], "challenge": []}
  for r in rows:
    i = r["prompt_index"]
    if i >= len(cols["Prompt"]) or cols["Prompt"][i] != r["prompt"]:
      raise ConfigError(f"--prompts: {prompts_file}: prompt {i} is not {r['prompt']!r}; give the "
                        "file the images were sampled from")
    out["category"].append(cols["Category"][i])
    out["challenge"].append(cols["Challenge"][i])
  return out


def summarize(protocol: str, scores: dict, set_values: dict, styles=None, groups=None) -> dict:
  """The protocol's table: {"metrics": {name: stats or {"value"}}, ...}.

  ``scores``: {metric: per-image array}; ``set_values``: {metric: value} (fid, diversity);
  ``styles``: per-image style (hpsv2.1); ``groups``: parti_groups output."""
  metrics = {name: stats(v) for name, v in scores.items()}
  metrics.update({name: {"value": float(v)} for name, v in set_values.items()})
  out = {"metrics": metrics}
  if protocol == "hpsv2.1":
    styles = np.asarray(styles)
    bench = hps_benchmark({s: np.asarray(scores["hpsv2.1"])[styles == s] for s in HPS_STYLES})
    out["metrics"]["hpsv2.1"] = dict(metrics["hpsv2.1"], mean=bench["mean"], styles=bench["styles"])
    out["per_style"] = {s: {name: stats(np.asarray(v)[styles == s]) for name, v in scores.items()}
                        for s in HPS_STYLES}
  if protocol == "parti":
    for key in ("category", "challenge"):
      labels = np.asarray(groups[key])
      out[f"per_{key}"] = {g: {name: stats(np.asarray(v)[labels == g]) for name, v in scores.items()}
                           for g in sorted(set(groups[key]))}
  return out


def headline(entry: dict) -> float:
  """The number a table shows for one metric."""
  return entry["mean"] if "mean" in entry else entry["value"]
