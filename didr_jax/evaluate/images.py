"""Reading the images to score: a ``didr_jax.sample`` folder (``index.jsonl``) or a plain folder of
real images (FID reference)."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from didr_jax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INDEX_FIELDS = ("prompt", "prompt_index", "seed", "file")


def read_index(folder: str) -> list[dict]:
  """The rows of ``folder/index.jsonl``; every listed file must exist (ConfigError naming it)."""
  path = os.path.join(folder, "index.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"--images: {path} not found; sample with python -m didr_jax.sample --out={folder}")
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"--images: {path}:{n}: not JSON ({e})") from None
      missing = [k for k in INDEX_FIELDS if k not in row]
      if missing:
        raise ConfigError(f"--images: {path}:{n}: missing field(s) {missing}")
      rows.append(row)
  if not rows:
    raise ConfigError(f"--images: {path} lists no images")
  absent = [r["file"] for r in rows if not os.path.isfile(os.path.join(folder, r["file"]))]
  if absent:
    raise ConfigError(f"--images: {len(absent)} image(s) listed in {path} are missing, first "
                      f"{absent[0]} (prompt {rows[[r['file'] for r in rows].index(absent[0])]['prompt']!r})")
  return rows


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def load_images(folder: str, rows: list[dict]) -> list[np.ndarray]:
  return [load_image(os.path.join(folder, r["file"])) for r in rows]


def read_folder(folder: str) -> list[np.ndarray]:
  """Every image of a folder (sorted by name, not recursive)."""
  if not os.path.isdir(folder):
    raise ConfigError(f"--metrics: fid: ref={folder} is neither a statistics .npz nor a folder")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
  if len(names) < 2:
    raise ConfigError(f"--metrics: fid: ref={folder} holds {len(names)} image(s); FID needs at least 2")
  return [load_image(os.path.join(folder, n)) for n in names]
