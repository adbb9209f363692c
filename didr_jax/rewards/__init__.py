"""Differentiable rewards behind one interface: ``load(name, path, **kw)(images, prompts) -> [B]``.

Images are NHWC in [-1, 1]; prompts are strings or int token ids [B, T]. Each reward is usable
inside ``jax.grad``. Names and published scales are documented in README.md ("Rewards").
"""
from __future__ import annotations

from typing import Mapping, Sequence

from didr_jax.rewards import clip_rewards
from didr_jax.rewards.preprocess import ImageInputError, check_images, clip_preprocess

_LOADERS = {
    "aesthetic": clip_rewards.load_aesthetic,
    "pickscore": clip_rewards.load_pickscore,
    "hpsv2": lambda path, **kw: clip_rewards.load_hps(path, version="hpsv2", **kw),
    "hpsv2.1": lambda path, **kw: clip_rewards.load_hps(path, version="hpsv2.1", **kw),
    "clipscore": clip_rewards.load_clipscore,
    "imagereward": lambda path, **kw: _imagereward().load_imagereward(path, **kw),
}


def _imagereward():
  from didr_jax.rewards import imagereward  # lazy: BLIP modules only when asked for
  return imagereward
REWARD_NAMES = tuple(_LOADERS)


def load(name: str, path: str, **kwargs):
  """Load reward ``name`` from local weights at ``path`` (see each loader for its keywords)."""
  if name not in _LOADERS:
    raise ValueError(f"reward {name!r} unknown; choose one of {REWARD_NAMES} "
                     "(or load_weighted for a sum)")
  return _LOADERS[name](path, **kwargs)


class WeightedReward:
  """sum_i weight_i * reward_i(images, prompts); ``terms`` gives each reward's scores."""

  def __init__(self, rewards: Mapping[str, tuple[float, object]]):
    if not rewards:
      raise ValueError("a weighted reward needs at least one term")
    self.rewards = dict(rewards)

  def terms(self, images, prompts=None) -> dict:
    return {name: fn(images, prompts) for name, (_, fn) in self.rewards.items()}

  def __call__(self, images, prompts=None):
    return sum(w * s for (w, _), s in zip(self.rewards.values(),
                                          self.terms(images, prompts).values()))


def load_weighted(spec: Sequence[Mapping]) -> WeightedReward:
  """``spec``: [{"name": "hpsv2.1", "weight": 1.0, "path": ..., **loader kwargs}, ...].

  A name may appear once; give ``key`` to use the same reward twice with different weights."""
  rewards = {}
  for item in spec:
    item = dict(item)
    missing = [k for k in ("name", "weight", "path") if k not in item]
    if missing:
      raise ValueError(f"weighted reward term {item}: missing field(s) {missing}")
    name, weight, path = item.pop("name"), float(item.pop("weight")), item.pop("path")
    key = item.pop("key", name)
    if key in rewards:
      raise ValueError(f"weighted reward: term {key!r} given twice (set 'key' to tell them apart)")
    rewards[key] = (weight, load(name, path, **item))
  return WeightedReward(rewards)


__all__ = ["load", "load_weighted", "WeightedReward", "REWARD_NAMES", "ImageInputError",
           "check_images", "clip_preprocess"]
