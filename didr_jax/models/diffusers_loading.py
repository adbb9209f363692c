"""Loading diffusers-format folders into our NNX models, the orbax cache, and export back.

``from_diffusers`` reads ``config.json`` (dispatching on ``_class_name``), builds the abstract model
under the given mesh and logical rules, and fills it from ``diffusion_pytorch_model.safetensors``
(single or sharded) through the explicit mapping table: every parameter is placed with its target
sharding as it is read, so no device holds a full copy of a sharded model. With ``cache_dir`` the
converted state is saved once as an orbax checkpoint and restored from it on later loads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models import pixart_mapping, zimage_mapping
from didr_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from didr_jax.models.unet import UNet2DConditionModel, UNetConfig
from didr_jax.models.unet_mapping import unet_rules
from didr_jax.models.vae import AutoencoderKL, VAEConfig
from didr_jax.models.vae_mapping import fix_legacy_vae_keys, vae_rules
from didr_jax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from didr_jax.weights import (
    WeightFileError, export_state, load_state, read_weights_folder, write_safetensors)
from didr_jax.weights.stacking import stack_layers, unstack_layers

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"
CACHE_STATE = "state"


@dataclasses.dataclass(frozen=True)
class ModelKind:
  config_cls: type
  model_cls: type
  rules: Callable
  fix_keys: Optional[Callable] = None    # tensors -> tensors (legacy key names)
  stacked: Optional[Callable] = None     # config -> {stack: (layers, block suffixes)} (weights.stacking)


KINDS = {
    "UNet2DConditionModel": ModelKind(UNetConfig, UNet2DConditionModel, unet_rules),
    "AutoencoderKL": ModelKind(VAEConfig, AutoencoderKL, vae_rules, fix_legacy_vae_keys),
    "PixArtTransformer2DModel": ModelKind(PixArtConfig, PixArtTransformer2DModel,
                                          pixart_mapping.pixart_rules,
                                          stacked=pixart_mapping.stacked_layers),
    "ZImageTransformer2DModel": ModelKind(ZImageConfig, ZImageTransformer2DModel,
                                          zimage_mapping.zimage_rules,
                                          stacked=zimage_mapping.stacked_layers),
}


def read_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(path):
    raise WeightFileError(f"{path}: no config.json; not a diffusers model folder")
  with open(path) as f:
    return json.load(f)


def _class_name(config: dict):
  """``_class_name``; PixArt-alpha's released transformers say ``Transformer2DModel`` (diffusers'
  pipeline loads them as ``PixArtTransformer2DModel`` whatever the file says)."""
  name = config.get("_class_name")
  if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
    return "PixArtTransformer2DModel"
  return name


def _kind(config: dict, where: str) -> tuple[str, ModelKind]:
  name = _class_name(config)
  if name not in KINDS:
    raise ValueError(f"{where}: _class_name {name!r} is not supported; choose one of "
                     f"{sorted(KINDS)} (text encoders load with from_transformers)")
  return name, KINDS[name]


def _kind_of_model(model) -> tuple[str, ModelKind]:
  for name, kind in KINDS.items():
    if isinstance(model, kind.model_cls):
      return name, kind
  raise TypeError(f"to_diffusers: {type(model).__name__} is not one of {sorted(KINDS)}")


def _mesh_and_rules(mesh, rules):
  mesh = shd.single_device_mesh() if mesh is None else mesh
  if rules is None:
    rules = shd.get_rules("replicated")
  elif isinstance(rules, str):
    rules = shd.get_rules(rules)
  return mesh, rules


class ShapeOnlyRngs:
  """Stand-in for ``nnx.Rngs`` when only shapes matter (abstract models): one fixed key.

  Each ``nnx.Rngs`` draw bumps a counter Variable, and Flax 0.12.8 then calls
  ``getattr(tracer, "sharding")``, whose error message walks the whole trace: building an abstract
  model becomes quadratic in its parameter count (SDXL UNet: 140 s instead of 7 s).
  """

  def params(self):
    return jax.random.key(0)


def abstract_for(class_name: str, cfg, *, dtype, param_dtype, attention, remat, mesh, rules):
  """(graphdef, abstract state with fitted NamedShardings) of the model for ``cfg``."""
  kind = KINDS[class_name]
  make = lambda: kind.model_cls(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                remat=remat, rngs=ShapeOnlyRngs())
  return shd.abstract_model(make, mesh, rules)


def _weight_fingerprint(folder: str) -> list:
  """(name, size, mtime) of the weight files: a changed file invalidates the cache entry."""
  names = sorted(n for n in os.listdir(folder)
                 if n.startswith(WEIGHTS_STEM) and n.endswith((".safetensors", ".json")))
  return [(n, os.path.getsize(os.path.join(folder, n)),
           os.stat(os.path.join(folder, n)).st_mtime_ns) for n in names]


def cache_entry_path(cache_dir: str, folder: str, config: dict, param_dtype) -> str:
  key = json.dumps([config, _weight_fingerprint(folder), str(jnp.dtype(param_dtype))],
                   sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(os.path.abspath(cache_dir), f"{config.get('_class_name')}-{digest}")


def save_cache_entry(entry: str, config: dict, state) -> None:
  """Orbax checkpoint of the converted params + the diffusers config (for ``didr_jax.export``)."""
  import orbax.checkpoint as ocp
  os.makedirs(entry, exist_ok=True)
  with open(os.path.join(entry, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(entry, CACHE_STATE), nnx.to_pure_dict(state))
  ckptr.wait_until_finished()


def is_cache_entry(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, CONFIG_NAME))
          and os.path.isdir(os.path.join(path, CACHE_STATE)))


def restore_state(entry: str, abstract_state):
  """Restore an orbax cache entry straight into the abstract state's shardings."""
  import orbax.checkpoint as ocp
  target = nnx.to_pure_dict(abstract_state)
  restored = ocp.StandardCheckpointer().restore(os.path.join(entry, CACHE_STATE), target)
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


def prepare_tensors(tensors: dict, class_name: str, cfg, what: str) -> dict:
  """Diffusers-named tensors as the mapping table reads them: legacy keys fixed, scanned blocks
  as lazily stacked ``<stack>.*.`` keys."""
  kind = KINDS[class_name]
  if kind.fix_keys:
    tensors = kind.fix_keys(tensors)
  return stack_layers(tensors, kind.stacked(cfg), what=what) if kind.stacked else tensors


def load_tensors(folder: str, class_name: str, cfg):
  """The folder's tensors by diffusers key, prepared (``prepare_tensors``)."""
  return prepare_tensors(read_weights_folder(folder, WEIGHTS_STEM), class_name, cfg, folder)


def from_diffusers(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                   rules=None, attention: str = "xla", remat: str = "none",
                   cache_dir: Optional[str] = None):
  """Load a diffusers folder of one of ``KINDS`` (UNet, VAE, PixArt, Z-Image) as our NNX model.

  ``rules``: a rule table or its name in ``didr_jax.sharding.RULES`` (default replicated on one
  device). ``cache_dir``: keep an orbax copy of the converted weights and reuse it next time.
  """
  config = read_config(folder)
  class_name, kind = _kind(config, folder)
  cfg = kind.config_cls.from_dict(config)
  mesh, rules = _mesh_and_rules(mesh, rules)
  graphdef, abs_state = abstract_for(class_name, cfg, dtype=dtype, param_dtype=param_dtype,
                                     attention=attention, remat=remat, mesh=mesh, rules=rules)
  entry = cache_entry_path(cache_dir, folder, config, param_dtype) if cache_dir else None
  if entry and is_cache_entry(entry):
    state = restore_state(entry, abs_state)
  else:
    state = load_state(abs_state, load_tensors(folder, class_name, cfg), kind.rules(cfg),
                       what=folder)
    if entry:
      save_cache_entry(entry, config, state)
  return nnx.merge(graphdef, state)


def from_cache_entry(entry: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                     rules=None, attention: str = "xla", remat: str = "none"):
  """Rebuild a model from an orbax cache entry written by ``from_diffusers(cache_dir=...)``."""
  if not is_cache_entry(entry):
    raise WeightFileError(f"{entry}: not a didr_jax cache entry (needs {CONFIG_NAME} and "
                          f"{CACHE_STATE}/)")
  config = read_config(entry)
  class_name, kind = _kind(config, entry)
  mesh, rules = _mesh_and_rules(mesh, rules)
  graphdef, abs_state = abstract_for(class_name, kind.config_cls.from_dict(config), dtype=dtype,
                                     param_dtype=param_dtype, attention=attention, remat=remat,
                                     mesh=mesh, rules=rules)
  return nnx.merge(graphdef, restore_state(entry, abs_state))


def to_diffusers(model, folder: str, *, dtype=np.float32) -> str:
  """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that diffusers loads.

  Parameters are gathered to host one at a time (needs them addressable from this process).
  Returns the safetensors path.
  """
  class_name, kind = _kind_of_model(model)
  tensors = export_state(nnx.state(model, nnx.Param), kind.rules(model.config), dtype=dtype)
  if kind.stacked:
    tensors = unstack_layers(tensors)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{WEIGHTS_STEM}.safetensors")
  write_safetensors(path, tensors, metadata={"format": "pt"})
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2)
  return path
