"""Write diffusers-format folders (config.json + safetensors) from our weights.

  python -m didr_jax.export --input=<cache entry or diffusers folder> --output=<folder> \
      [--dtype=float32|float16|bfloat16]
  python -m didr_jax.export --workdir=<t2i training run> [--step=N] [--output=<folder>] [--dtype=...]

``--input`` is either an orbax cache entry written by
``didr_jax.models.from_diffusers(folder, cache_dir=...)`` (a folder holding ``config.json`` and
``state/``) or a diffusers model folder (re-exported, e.g. to change dtype or merge shards).
``--workdir`` exports the generator (and its EMA) of a training checkpoint, the latest or
``--step``, into ``<output>/unet[_ema]`` or ``<output>/transformer[_ema]`` (the DiT backbones;
default output ``<workdir>/export_step<N>``), on demand
and while the run goes on (``didr_jax.pipelines.export_checkpoint``). From Python,
``didr_jax.models.to_diffusers(model, folder)`` exports a model in memory. The output loads with
``diffusers.<_class_name>.from_pretrained(folder)``.
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from didr_jax.models.layers import DTYPES as COMPUTE_DTYPES

# the model's compute dtypes, and float16 as a storage format (diffusers' usual fp16 variant)
DTYPES = dict(COMPUTE_DTYPES, float16=np.float16)


def export(input_path: str, output: str, dtype: str = "float32") -> str:
  """Load ``input_path`` (cache entry or diffusers folder) and write it to ``output``."""
  from didr_jax.models.diffusers_loading import (
      from_cache_entry, from_diffusers, is_cache_entry, to_diffusers)
  model = from_cache_entry(input_path) if is_cache_entry(input_path) else from_diffusers(input_path)
  return to_diffusers(model, output, dtype=DTYPES[dtype])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if (f.input is None) == (f.workdir is None):
    raise app.UsageError("give exactly one of --input (a model) or --workdir (a training run)")
  if f.input is not None:
    if f.output is None or f.step is not None:
      raise app.UsageError("--input needs --output and takes no --step")
    print(f"wrote {export(f.input, f.output, f.dtype)}")
    return
  from didr_jax.errors import ConfigError
  from didr_jax.pipelines.export_checkpoint import export_checkpoint
  from didr_jax.training.checkpoint import CheckpointNotFoundError
  try:
    folders = export_checkpoint(f.workdir, step=f.step, output=f.output, dtype=DTYPES[f.dtype])
  except (ConfigError, CheckpointNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for folder in folders:
    print(f"wrote {folder}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (e.g. next to
  # didr_jax.convert or the trainer) never collides with other flag definitions.
  flags.DEFINE_string("input", None, "Cache entry (config.json + state/) or diffusers folder.")
  flags.DEFINE_string("workdir", None, "A t2i training run: export its generator (and EMA).")
  flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Output folder (--input: required; --workdir: default "
                      "<workdir>/export_step<N>).")
  flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "dtype of the written tensors.")
  app.run(main)
