"""Sample metrics of the digits experiment (host NumPy, float64).

* Frechet distance between Gaussian fits of features: ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2),
  with tr((C1 C2)^1/2) from symmetric eigendecompositions (= tr((C1^1/2 C2 C1^1/2)^1/2)).
* k-NN precision / recall (Kynkaanniemi et al. 2019): a sample is on the other set's manifold
  when it lies within the k-th-nearest-neighbour radius of some point of that set.
* diversity: mean pairwise feature distance within a class, averaged over classes.
* off-manifold mass: fraction of samples whose pixel distance to the nearest train image exceeds
  the ``quantile`` of the real test images' nearest-train distances (1% of real test images by
  construction at quantile 0.99), measured in pixel space so no learned network can be fooled.
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(features):
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(c):
  w, v = np.linalg.eigh((c + c.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, c1, mu2, c2) -> float:
  s1 = _sqrt_psd(np.asarray(c1, np.float64))
  middle = s1 @ np.asarray(c2, np.float64) @ s1
  trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None))))
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  return float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * trace_sqrt)


def features_fd(f1, f2) -> float:
  return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


def pairwise_distances(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d2 = np.sum(a ** 2, 1)[:, None] + np.sum(b ** 2, 1)[None, :] - 2.0 * a @ b.T
  return np.sqrt(np.clip(d2, 0, None))


def knn_radii(x, k: int):
  """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
  d = pairwise_distances(x, x)
  return np.sort(d, axis=1)[:, k]     # column 0 is the point itself


def coverage_fraction(queries, support, k: int) -> float:
  """Fraction of ``queries`` inside the union of the k-NN balls of ``support``."""
  inside = pairwise_distances(queries, support) <= knn_radii(support, k)[None, :]
  return float(np.mean(np.any(inside, axis=1)))


def precision_recall(real, fake, k: int) -> tuple[float, float]:
  return coverage_fraction(fake, real, k), coverage_fraction(real, fake, k)


def diversity(features, labels) -> float:
  """Mean over classes of the mean pairwise (i < j) feature distance within the class."""
  per_class = []
  for c in np.unique(labels):
    f = np.asarray(features)[labels == c]
    if len(f) > 1:
      d = pairwise_distances(f, f)
      per_class.append(d[np.triu_indices(len(f), 1)].mean())
  return float(np.mean(per_class))


def nearest_distances(queries, support):
  """Pixel-space distance of each query image to its nearest support image."""
  q = np.asarray(queries, np.float64).reshape(len(queries), -1)
  s = np.asarray(support, np.float64).reshape(len(support), -1)
  return pairwise_distances(q, s).min(axis=1)


def off_manifold_threshold(test_images, train_images, quantile: float) -> float:
  return float(np.quantile(nearest_distances(test_images, train_images), quantile))


def off_manifold_mass(images, train_images, threshold: float) -> float:
  return float(np.mean(nearest_distances(images, train_images) > threshold))


def sample_metrics(*, images, labels, reward_logp, heldout_logp, reward_pred, heldout_pred,
                   features, real, train_images, knn_k: int, off_threshold: float) -> dict:
  """Every metric of one set of samples. ``real``: dict(features, labels) of the real test set;
  ``*_logp``: log p(label | x) per sample; ``*_pred``: argmax class per sample."""
  labels = np.asarray(labels)
  per_class = {}
  for c in np.unique(real["labels"]):
    mine, theirs = features[labels == c], real["features"][real["labels"] == c]
    per_class[str(int(c))] = features_fd(mine, theirs) if len(mine) > 1 else float("nan")
  precision, recall = precision_recall(real["features"], features, knn_k)
  return {
      "reward": float(np.mean(reward_logp)), "heldout_reward": float(np.mean(heldout_logp)),
      "reward_accuracy": float(np.mean(np.asarray(reward_pred) == labels)),
      "heldout_accuracy": float(np.mean(np.asarray(heldout_pred) == labels)),
      "fd": features_fd(features, real["features"]), "fd_per_class": per_class,
      "fd_class_mean": float(np.mean(list(per_class.values()))),
      "precision": precision, "recall": recall, "diversity": diversity(features, labels),
      "off_manifold": off_manifold_mass(images, train_images, off_threshold),
  }


def paired_bootstrap(features_a, logp_a, features_b, logp_b, real_features, *, n_boot: int, seed: int) -> dict:
  """Run a minus run b: FD and mean held-out log p differences, with their paired-bootstrap standard
  deviations. Both runs share their noise and labels, so sample i of a and of b is resampled
  together (and the real set once per replicate): the spread is that of the difference."""
  rng = np.random.default_rng(seed)
  n, m = len(features_a), len(real_features)
  d_fd, d_r = [], []
  for _ in range(n_boot):
    i, j = rng.integers(0, n, n), rng.integers(0, m, m)
    real = real_features[j]
    d_fd.append(features_fd(features_a[i], real) - features_fd(features_b[i], real))
    d_r.append(float(np.mean(logp_a[i]) - np.mean(logp_b[i])))
  return {"d_fd": features_fd(features_a, real_features) - features_fd(features_b, real_features),
          "sd_fd": float(np.std(d_fd)), "d_heldout": float(np.mean(logp_a) - np.mean(logp_b)),
          "sd_heldout": float(np.std(d_r))}
