"""Convert a torch pickle checkpoint (.bin/.ckpt/.pt/.pth) to safetensors, once, offline.

  python -m didr_jax.convert --input=unet/diffusion_pytorch_model.bin \
      [--output=unet/diffusion_pytorch_model.safetensors] [--key=state_dict]

Runtime code never unpickles; it refuses pickles and names this command. torch is imported only
inside this tool, and the pickle is read with ``torch.load(weights_only=True)`` (no arbitrary
code). ``--key`` selects a nested dict (dotted, e.g. ``state_dict`` or ``module.ema``); without
it a top-level ``state_dict`` entry is used when present (Lightning / LDM ``.ckpt`` files).
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from absl import app, flags

from didr_jax.weights import write_safetensors



def _to_numpy(tensor) -> np.ndarray:
  import torch
  t = tensor.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def convert_file(input_path: str, output_path: str | None = None, key: str = "") -> str:
  """Convert one pickle; raises naming every entry that is not a tensor."""
  import torch
  obj = torch.load(input_path, map_location="cpu", weights_only=True)
  if key:
    for part in key.split("."):
      if not isinstance(obj, dict) or part not in obj:
        raise KeyError(f"{input_path}: no entry {part!r} on the way to --key={key}")
      obj = obj[part]
  elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{input_path}: expected a dict of tensors, found {type(obj).__name__}")
  bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise ValueError(f"{input_path}: entries that are not tensors: {bad[:20]}; pick the state "
                     f"dict with --key")
  output_path = output_path or os.path.splitext(input_path)[0] + ".safetensors"
  tensors = {k: _to_numpy(v) for k, v in obj.items()}
  write_safetensors(output_path, tensors,
                    metadata={"format": "pt", "converted_from": os.path.basename(input_path)})
  return output_path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  print(f"wrote {convert_file(f.input, f.output, f.key)}")


if __name__ == "__main__":
  # Flags are defined only when run as a program (see didr_jax/export.py).
  flags.DEFINE_string("input", None, "Torch pickle checkpoint to convert.")
  flags.DEFINE_string("output", None, "Output .safetensors (default: input stem).")
  flags.DEFINE_string("key", "", "Dotted key of the state dict inside the pickle.")
  flags.mark_flags_as_required(["input"])
  app.run(main)
