"""Write a diffusers-format folder (config.json + safetensors) from our weights.

  python -m didr_jax.export --input=<cache entry or diffusers folder> --output=<folder> \
      [--dtype=float32|float16|bfloat16]

``--input`` is either an orbax cache entry written by
``didr_jax.models.from_diffusers(folder, cache_dir=...)`` (a folder holding ``config.json`` and
``state/``) or a diffusers model folder (re-exported, e.g. to change dtype or merge shards). From
Python, ``didr_jax.models.to_diffusers(model, folder)`` exports a model in memory, such as a
fine-tuned generator. The output loads with ``diffusers.<_class_name>.from_pretrained(folder)``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from absl import app, flags

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}



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
  print(f"wrote {export(f.input, f.output, f.dtype)}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (e.g. next to
  # didr_jax.convert or the trainer) never collides with other flag definitions.
  flags.DEFINE_string("input", None, "Cache entry (config.json + state/) or diffusers folder.")
  flags.DEFINE_string("output", None, "Folder to write config.json + safetensors into.")
  flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "dtype of the written tensors.")
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
