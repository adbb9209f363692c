"""Frechet Inception Distance, numerically as pytorch-fid computes it (numpy + scipy, no torch).

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to Inception pool3
features (``didr_jax.models.inception``). Statistics are stored in pytorch-fid's ``.npz`` layout
(keys ``mu``, ``sigma``), so reference statistics computed by pytorch-fid load unchanged.
``clean_resize`` is clean-fid's "clean" resize (PIL bicubic on float channels), written with numpy
and PIL only.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of [N, D] features in float64; ``np.cov(rowvar=False)`` as pytorch-fid."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_statistics: need [N >= 2, D] features, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """pytorch-fid's ``calculate_frechet_distance``: scipy ``sqrtm`` of S1 S2; if that is not
  finite (a singular product) retry with ``eps`` added to both diagonals; drop a small imaginary
  part, and raise if the diagonal's imaginary part exceeds 1e-3."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: mean vectors differ in shape {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape:
    raise ValueError(f"frechet_distance: covariances differ in shape {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} "
                       "in sqrtm(sigma1 @ sigma2)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_statistics(path: str, mu, sigma) -> None:
  """pytorch-fid's format: ``np.savez_compressed(path, mu=mu, sigma=sigma)``."""
  np.savez_compressed(path, mu=np.asarray(mu), sigma=np.asarray(sigma))


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) from a pytorch-fid ``.npz``; ValueError naming the file otherwise."""
  f = np.load(path)
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: not an .npz archive of FID statistics (keys 'mu' and 'sigma')")
  with f:
    for key in ("mu", "sigma"):
      if key not in f.files:
        raise ValueError(f"{path}: FID statistics lack the key {key!r} (found {sorted(f.files)})")
    mu, sigma = f["mu"][:], f["sigma"][:]
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: FID statistics need mu [D] and sigma [D, D], found mu "
                     f"{mu.shape} and sigma {sigma.shape}")
  return mu, sigma


def clean_resize(images_uint8, size: int = 299) -> np.ndarray:
  """clean-fid's "clean" resize (``make_resizer("PIL", False, "bicubic", (size, size))``).

  Each channel is resized as a float32 PIL image (mode "F", so no uint8 rounding in between)
  with bicubic filtering, then clipped to [0, 255]. Input [H, W, 3] or [B, H, W, 3] uint8;
  output float32 of the same rank at ``size`` x ``size``, in [0, 255].
  """
  x = np.asarray(images_uint8)
  if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
    raise ValueError(f"clean_resize: need uint8 [H, W, 3] or [B, H, W, 3], got {x.dtype} {x.shape}")
  batch = x[None] if x.ndim == 3 else x
  out = np.empty((batch.shape[0], size, size, 3), np.float32)
  for i, img in enumerate(batch):
    for c in range(3):
      channel = Image.fromarray(img[:, :, c].astype(np.float32))
      resized = channel.resize((size, size), resample=Image.BICUBIC)
      out[i, :, :, c] = np.asarray(resized).clip(0, 255)
  return out if x.ndim == 4 else out[0]
