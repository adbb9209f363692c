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
from didr_jax.pipelines.experiment import export_generator
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


def lora_of_generator(cfg):
  """The run's LoraRun when its generator trains adapters, else None (the setting checked
  against the generator network's table: LoraError naming the field)."""
  from didr_jax.pipelines import lora_training
  b = backbones.get(cfg.backbone)
  run = lora_training.from_config(cfg, KINDS[b.network_class].rules(generator_config(cfg)))
  return run if run is not None and run.adapts("gen") else None


def generator_base(cfg, mesh):
  """(graph, params) the generator's adapters apply to: the ``:tiny`` reference rebuilt from the
  run's seed, the run's generator checkpoint, or its reference's network."""
  from didr_jax.pipelines import t2i
  b, m = backbones.get(cfg.backbone), cfg.model
  rules = sharding.get_rules(cfg.mesh.rules)
  if cfg.variant == "tiny":
    from didr_jax.pipelines import tiny
    return tiny.network(cfg.backbone, seed=cfg.seed, mesh=mesh, rules=rules, dtype=DTYPES[m.dtype],
                        param_dtype=DTYPES[m.param_dtype], width=cfg.tiny.width)
  kw = dict(t2i.model_kwargs(cfg, mesh, rules), attention="xla", remat="none", cache_dir=None)
  path = m.generator or os.path.join(m.reference, b.network_folder)
  return t2i.load_generator(path, b.network_class, generator_config(cfg), kw)


def restore_generators(cfg, workdir: str, fields, step: int | None, mesh):
  """(step, graph, {field: trees}, lora) for ``fields`` (gen_params / gen_ema) of a checkpoint:
  network params, or under LoRA the adapters with ``lora = (LoraRun, base params)``."""
  run = lora_of_generator(cfg)
  if run is None:
    graph, like = abstract_generator(cfg, mesh)
    lora = None
  else:
    graph, base = generator_base(cfg, mesh)
    like, lora = run.abstract(base), (run, base)
  step, trees = restore_fields(os.path.join(workdir, "checkpoints"), {f: like for f in fields}, step)
  return step, graph, trees, lora


def export_checkpoint(workdir: str, *, step: int | None = None, output: str | None = None,
                      dtype=np.float32) -> list[str]:
  """Write ``unet`` / ``transformer`` (and its ``_ema`` when the run keeps one and
  ``eval.export_ema``; LoRA runs also ``_lora`` adapters, as the run's own export) of checkpoint
  ``step`` (default: the latest) under ``output`` (default: ``<workdir>/export_step<N>``)."""
  cfg = run_config(workdir)
  fields = ["gen_params"] + (["gen_ema"] if cfg.align.ema_decay > 0 and cfg.eval.export_ema else [])
  step, graph, trees, lora = restore_generators(cfg, workdir, fields, step, sharding.make_mesh((1, -1, 1)))
  name = backbones.get(cfg.backbone).network_folder
  names = {"gen_params": name, "gen_ema": f"{name}_ema"}
  folder = output or os.path.join(workdir, f"export_step{step}")
  run, base = lora if lora else (None, None)
  return export_generator(graph, {names[k]: trees[k] for k in fields}, folder, lora_run=run, base=base,
                          with_base=run is not None and cfg.variant == "tiny", dtype=dtype)
