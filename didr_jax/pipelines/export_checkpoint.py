"""On-demand export of a t2i run: the generator (and EMA) of any saved step as diffusers folders.

  python -m didr_jax.export --workdir=runs/sdxl-didr [--step=N] [--output=DIR] [--dtype=float16]

Reads the run's ``config.json``, builds only the generator network's abstract params (no
reference, VAE, text encoders or reward are loaded) and restores just ``gen_params`` / ``gen_ema``
from the orbax checkpoint onto this machine's devices (FSDP over all of them), then writes what
diffusers' ``from_pretrained`` of the backbone's class (``UNet2DConditionModel``,
``PixArtTransformer2DModel``, ``ZImageTransformer2DModel``) loads. It may run while training goes on.
"""
from __future__ import annotations

import json
import os

import numpy as np
from ml_collections import ConfigDict

from didr_jax import sharding
from didr_jax.errors import ConfigError
from didr_jax.models.diffusers_loading import KINDS, abstract_for, read_config
from didr_jax.pipelines import backbones
from didr_jax.pipelines.experiment import export_networks
from didr_jax.models.layers import DTYPES
from didr_jax.training.checkpoint import restore_fields


def run_config(workdir: str) -> ConfigDict:
  """The resolved config a t2i run wrote into its workdir."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"config.json: {path} not found; --workdir must be the folder of a "
                      "training run (python -m didr_jax.main ... --workdir=...)")
  with open(path) as f:
    cfg = ConfigDict(json.load(f))
  if cfg.get("experiment") != "t2i":
    raise ConfigError(f"config.experiment: {path} is a {cfg.get('experiment')!r} run; only t2i "
                      "runs have a generator network to export")
  return cfg


def generator_config(cfg):
  """The generator's architecture: the tiny network, the generator folder's, or the reference's (a
  single generator .safetensors must match the reference's network, as the trainer checks)."""
  b = backbones.get(cfg.backbone)
  if cfg.variant == "tiny":
    from didr_jax.pipelines import tiny
    return tiny.network_config(cfg.backbone, cfg.tiny.width)
  gen = cfg.model.generator
  folder = gen if gen and os.path.isdir(gen) else os.path.join(cfg.model.reference, b.network_folder)
  return KINDS[b.network_class].config_cls.from_dict(read_config(folder))


def abstract_generator(cfg, mesh):
  """(graph, abstract params) of a run's generator network placed on ``mesh`` with the run's rules
  (XLA attention, no remat: what restoring it for export or sampling needs)."""
  return abstract_for(backbones.get(cfg.backbone).network_class, generator_config(cfg),
                      dtype=DTYPES[cfg.model.dtype],
                      param_dtype=DTYPES[cfg.model.param_dtype], attention="xla", remat="none", mesh=mesh,
                      rules=sharding.get_rules(cfg.mesh.rules))


def export_checkpoint(workdir: str, *, step: int | None = None, output: str | None = None,
                      dtype=np.float32) -> list[str]:
  """Write ``unet`` / ``transformer`` (and its ``_ema`` when the run keeps one and
  ``eval.export_ema``) of checkpoint ``step`` (default: the latest) under ``output`` (default:
  ``<workdir>/export_step<N>``)."""
  cfg = run_config(workdir)
  graph, abstract = abstract_generator(cfg, sharding.make_mesh((1, -1, 1)))
  like = {"gen_params": abstract}
  if cfg.align.ema_decay > 0 and cfg.eval.export_ema:
    like["gen_ema"] = abstract
  step, trees = restore_fields(os.path.join(workdir, "checkpoints"), like, step)
  name = backbones.get(cfg.backbone).network_folder
  names = {"gen_params": name, "gen_ema": f"{name}_ema"}
  folder = output or os.path.join(workdir, f"export_step{step}")
  return export_networks(graph, {names[k]: trees[k] for k in like}, folder, dtype=dtype)
