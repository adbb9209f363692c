"""scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download), scaled
to [-1, 1] and split into train / test by a seeded stratified permutation.

Images are NHWC ``[N, R, R, 1]`` float32. The native size is 8x8; ``resolution=16`` upsamples
(bilinear) for the diffusion models, and :func:`to_native` maps model-size images back (2x2 mean),
so classifiers, metrics and ``samples.npz`` always see native 8x8 images.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NATIVE = 8
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES          # the "no label" id of CFG's unconditional branch
RESOLUTIONS = (8, 16)


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
  train_images: np.ndarray        # [N, 8, 8, 1] float32 in [-1, 1]
  train_labels: np.ndarray        # [N] int32
  test_images: np.ndarray
  test_labels: np.ndarray


def load_split(test_fraction: float, seed: int) -> DigitsSplit:
  """Stratified split: in every class, the first round(test_fraction * n_c) images of a seeded
  permutation go to the test set."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]   # 0..16 -> [-1, 1]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[: int(round(test_fraction * len(idx)))]] = True
  return DigitsSplit(images[~test], labels[~test], images[test], labels[test])


def to_model(images, resolution: int):
  """Native 8x8 images -> the diffusion models' resolution (bilinear upsampling)."""
  if resolution == NATIVE:
    return images
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, resolution, resolution, c), "bilinear")


def to_native(images):
  """Model-resolution images -> native 8x8 (mean over f x f blocks; identity at 8x8)."""
  n, r, _, c = images.shape
  f = r // NATIVE
  if f == 1:
    return images
  return jnp.mean(images.reshape(n, NATIVE, f, NATIVE, f, c), axis=(2, 4))
