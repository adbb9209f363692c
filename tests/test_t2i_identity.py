"""The t2i checkpoint identity holds the run's mathematics only: execution fields (attention
kernel, remat, caches, precomputed embeddings, step count, microbatches) may change on resume, and
input folders count by content, not by location."""
import os
import shutil
import types

import numpy as np
import pytest

from configs.sdxl import get_config
from didr_jax.pipelines.experiment import content_fingerprint, identity

SAMPLER = types.SimpleNamespace(fingerprint="prompts-v1")


def _folder(root, weights_bytes=3 << 20, config='{"a": 1}'):
  os.makedirs(os.path.join(root, "unet"), exist_ok=True)
  with open(os.path.join(root, "unet", "config.json"), "w") as f:
    f.write(config)
  rng = np.random.default_rng(0)
  with open(os.path.join(root, "unet", "model.safetensors"), "wb") as f:
    f.write(rng.bytes(weights_bytes))
  return root


def _with(cfg, **fields):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for dotted, value in fields.items():
      group, key = dotted.split("__")
      cfg[group][key] = value
  return cfg


def test_execution_fields_do_not_change_the_identity():
  cfg = get_config("tiny")
  base = identity(cfg, SAMPLER)
  for change in (dict(model__attention="cudnn"), dict(model__remat="dots_no_batch"),
                 dict(model__cache_dir="/elsewhere"), dict(data__precompute_embeddings=True),
                 dict(align__steps=cfg.align.steps * 2), dict(align__grad_accum=2)):
    assert identity(_with(cfg, **change), SAMPLER) == base, change
  for change in (dict(objective__beta=0.5), dict(model__label_t=250), dict(align__k_ta=cfg.align.k_ta + 1)):
    assert identity(_with(cfg, **change), SAMPLER) != base, change
  assert identity(cfg, types.SimpleNamespace(fingerprint="prompts-v2")) != base


def test_a_moved_folder_keeps_the_identity_and_new_content_changes_it(tmp_path):
  a = _folder(str(tmp_path / "a"))
  b = str(tmp_path / "mounted" / "b")
  shutil.copytree(a, b)
  cfg = get_config("tiny")
  ida = identity(_with(cfg, model__reference=a), SAMPLER)
  assert identity(_with(cfg, model__reference=b), SAMPLER) == ida
  assert content_fingerprint(a) == content_fingerprint(b) != ""
  with open(os.path.join(b, "unet", "config.json"), "w") as f:
    f.write('{"a": 2}')
  assert identity(_with(cfg, model__reference=b), SAMPLER) != ida
  c = _folder(str(tmp_path / "c"))
  with open(os.path.join(c, "unet", "model.safetensors"), "r+b") as f:    # last MiB differs
    f.seek(-10, os.SEEK_END)
    f.write(b"0123456789")
  assert content_fingerprint(c) != content_fingerprint(a)
  assert content_fingerprint("") == ""


@pytest.mark.parametrize("size", [100, 5 << 20])
def test_fingerprint_of_a_single_file_ignores_its_folder(tmp_path, size):
  rng = np.random.default_rng(1)
  data = rng.bytes(size)
  for d in ("x", "y"):
    os.makedirs(tmp_path / d)
    (tmp_path / d / "reward.safetensors").write_bytes(data)
  assert content_fingerprint(str(tmp_path / "x" / "reward.safetensors")) == \
      content_fingerprint(str(tmp_path / "y" / "reward.safetensors"))
