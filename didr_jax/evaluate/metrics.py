"""Evaluation metrics from ``--metrics=NAME:PATH[:KEY=VALUE...],...``: per-image scores through each
reward's official preprocessing, and set-level FID and CLIP diversity.

  pickscore:FOLDER                     HF CLIPModel (+ tokenizer files or tokenizer=FOLDER)
  clipscore:FOLDER                     100 max(cos, 0) of an HF CLIP (torchmetrics; COCO: ViT-B/32)
  hpsv2:FILE / hpsv2.1:FILE            OpenCLIP-naming ViT-H-14 file, tokenizer=FOLDER [config=NAME]
  aesthetic:HEAD                       LAION head safetensors, clip=FOLDER (OpenAI ViT-L/14)
  imagereward:FILE                     converted ImageReward.safetensors (med_config, tokenizer in its folder)
  fid:INCEPTION                        pytorch-fid's Inception (safetensors), ref=NPZ|FOLDER of real images
  diversity:FOLDER                     HF CLIP: mean pairwise distance of the L2-normalised image
                                       embeddings of one prompt's seeds, averaged over prompts
HPS scores are reported as 100 x cosine (the benchmark's convention); the others in their own units.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from didr_jax.errors import ConfigError
from didr_jax.evaluate import official

# reward name -> official preprocessing (didr_jax/evaluate/official.py), score multiplier
REWARD_METRICS = {"pickscore": ("hf_crop", 1.0), "clipscore": ("hf_crop", 1.0),
                  "hpsv2": ("longest_pad", 100.0), "hpsv2.1": ("longest_pad", 100.0),
                  "aesthetic": ("tv_crop", 1.0), "imagereward": ("tv_crop", 1.0)}
SET_METRICS = ("fid", "diversity")
NAMES = tuple(REWARD_METRICS) + SET_METRICS
LOWER_IS_BETTER = ("fid",)
OPTIONS = {"pickscore": ("tokenizer",), "clipscore": ("tokenizer", "config"),
           "hpsv2": ("tokenizer", "config"), "hpsv2.1": ("tokenizer", "config"),
           "aesthetic": ("clip", "clip_config"), "imagereward": ("med_config", "tokenizer"),
           "fid": ("ref",), "diversity": ()}
REQUIRED = {"hpsv2": ("tokenizer",), "hpsv2.1": ("tokenizer",), "aesthetic": ("clip",), "fid": ("ref",)}
PATH_OPTIONS = ("tokenizer", "clip", "med_config", "ref")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  name: str
  path: str
  options: dict


def parse_specs(text: str) -> list[MetricSpec]:
  """``NAME:PATH[:KEY=VALUE...],...``; every name, key and path checked (ConfigError naming it)."""
  specs = []
  for item in [t for t in (text or "").split(",") if t.strip()]:
    parts = item.strip().split(":")
    name = parts[0]
    if name not in NAMES:
      raise ConfigError(f"--metrics: {name!r} unknown; choose from {NAMES}")
    if len(parts) < 2 or not parts[1]:
      raise ConfigError(f"--metrics: {name}: expected {name}:PATH")
    options = {}
    for kv in parts[2:]:
      key, sep, value = kv.partition("=")
      if not sep or key not in OPTIONS[name]:
        raise ConfigError(f"--metrics: {name}: option {kv!r}; {name} takes {OPTIONS[name] or 'none'} as KEY=VALUE")
      options[key] = value
    for key in REQUIRED.get(name, ()):
      if key not in options:
        raise ConfigError(f"--metrics: {name}: needs {key}=PATH")
    for what, path in [("PATH", parts[1])] + [(k, v) for k, v in options.items() if k in PATH_OPTIONS]:
      if not os.path.exists(path):
        raise ConfigError(f"--metrics: {name}: {what} {path} not found")
    if any(s.name == name for s in specs):
      raise ConfigError(f"--metrics: {name} given twice")
    specs.append(MetricSpec(name, parts[1], options))
  if not specs:
    raise ConfigError("--metrics: empty; expected NAME:PATH[,NAME:PATH...]")
  return specs


def _batches(n: int, batch: int):
  for start in range(0, n, batch):
    yield start, min(start + batch, n)


def _padded(x: np.ndarray, batch: int) -> np.ndarray:
  """Pad the leading axis to ``batch`` rows (one compiled shape for every batch)."""
  if len(x) == batch:
    return x
  return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])


class RewardMetric:
  """Per-image scores of one reward through its official preprocessing."""

  def __init__(self, spec: MetricSpec):
    from didr_jax import rewards
    self.name = spec.name
    self.reward = rewards.load(spec.name, spec.path, **spec.options)
    self.mode, self.scale = REWARD_METRICS[spec.name]
    self._score = jax.jit(self.reward.score_pixels)

  def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str], batch: int) -> np.ndarray:
    out = []
    for a, b in _batches(len(images), batch):
      pixels = _padded(official.preprocess(images[a:b], self.reward.image_size, self.mode), batch)
      ids = None
      if self.reward.tokenizer is not None:
        ids = _padded(np.asarray(self.reward.tokenize(list(prompts[a:b]))), batch)
      out.append(np.asarray(self._score(self.reward.params, pixels, ids), np.float64)[:b - a])
    return self.scale * np.concatenate(out)


class FIDMetric:
  """FID of the images against ``ref`` (pytorch-fid .npz statistics or a folder of real images):
  clean-fid's PIL resize to 299, pytorch-fid's Inception pool3, pytorch-fid's distance."""

  def __init__(self, spec: MetricSpec):
    from didr_jax.models.inception_mapping import load_inception
    self.name, self.ref = "fid", spec.options["ref"]
    self.model = load_inception(spec.path)
    self._features = jax.jit(lambda m, x: m(x))

  def features(self, images: Sequence[np.ndarray], batch: int) -> np.ndarray:
    from didr_jax.metrics.fid import clean_resize
    out = []
    for a, b in _batches(len(images), batch):
      x = _padded(np.stack([clean_resize(im) for im in images[a:b]]) / 255.0, batch).astype(np.float32)
      out.append(np.asarray(self._features(self.model, x), np.float64)[:b - a])
    return np.concatenate(out)

  def reference_statistics(self, batch: int):
    from didr_jax.evaluate.images import read_folder
    from didr_jax.metrics.fid import feature_statistics, load_statistics
    if os.path.isfile(self.ref):
      return load_statistics(self.ref)
    return feature_statistics(self.features(read_folder(self.ref), batch))

  def __call__(self, images: Sequence[np.ndarray], batch: int) -> float:
    from didr_jax.metrics.fid import feature_statistics, frechet_distance
    mu, sigma = feature_statistics(self.features(images, batch))
    return frechet_distance(mu, sigma, *self.reference_statistics(batch))


class DiversityMetric:
  """Mean pairwise Euclidean distance between the L2-normalised CLIP image embeddings of the
  seeds of each prompt (prompts with one image are left out), averaged over prompts."""

  def __init__(self, spec: MetricSpec):
    from didr_jax.rewards.clip_rewards import load_clip
    from flax import nnx
    self.name = "diversity"
    model = load_clip(spec.path)
    self.image_size = model.config.vision.image_size
    graph, params = nnx.split(model)
    self._embed = jax.jit(lambda p, x: nnx.merge(graph, p).encode_image(x))
    self.params = params

  def __call__(self, images: Sequence[np.ndarray], groups: Sequence, batch: int) -> float:
    """``groups``: per image, the key of its prompt (images of one key are one prompt's seeds)."""
    emb = []
    for a, b in _batches(len(images), batch):
      x = _padded(official.preprocess(images[a:b], self.image_size, "hf_crop"), batch)
      emb.append(np.asarray(self._embed(self.params, x), np.float64)[:b - a])
    emb = np.concatenate(emb)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    by_prompt = {}
    for e, key in zip(emb, groups):
      by_prompt.setdefault(key, []).append(e)
    per_prompt = []
    for g in by_prompt.values():
      if len(g) > 1:
        g = np.stack(g)
        d = np.linalg.norm(g[:, None] - g[None], axis=-1)
        per_prompt.append(d[np.triu_indices(len(g), 1)].mean())
    if not per_prompt:
      raise ConfigError("--metrics: diversity needs several seeds of a prompt (sample with "
                        "--images_per_prompt >= 2)")
    return float(np.mean(per_prompt))


def load(spec: MetricSpec):
  if spec.name == "fid":
    return FIDMetric(spec)
  if spec.name == "diversity":
    return DiversityMetric(spec)
  return RewardMetric(spec)
