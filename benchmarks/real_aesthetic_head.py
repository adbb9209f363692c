"""The real LAION aesthetic head (a PyTorch .pth, e.g. laion_aesthetic_v2_linearMSE.pth):
converted with ``didr_jax.convert`` and scored by our JAX head against the PyTorch MLP on the same
random unit embeddings. A check of real weights, kept out of the test suite because the file is not
part of the repository (the head's parity on random weights is tests/test_rewards.py's).

    PYTHONPATH=. python benchmarks/real_aesthetic_head.py --pth PATH [--n 64]

Needs the test dependencies (torch). Exits 1 when the two disagree beyond 1e-5.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import LoadRecord  # noqa: E402



def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pth", required=True, help="the LAION aesthetic head .pth")
  ap.add_argument("--n", type=int, default=64, help="random unit embeddings scored")
  args = ap.parse_args(argv)
  if not os.path.isfile(args.pth):
    raise SystemExit(f"--pth: {args.pth}: file not found")
  import jax
  import numpy as np
  import torch
  from didr_jax.convert import convert_file
  from didr_jax.rewards.clip_rewards import load_aesthetic_head
  from tests import reward_torch as rt

  with tempfile.TemporaryDirectory() as tmp:
    out = convert_file(args.pth, os.path.join(tmp, "aesthetic.safetensors"))
    head = load_aesthetic_head(out, 768)
  mlp = rt.aesthetic_mlp(768)
  mlp.load_state_dict(torch.load(args.pth, map_location="cpu", weights_only=True))
  e = np.random.default_rng(0).standard_normal((args.n, 768)).astype(np.float32)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  with torch.no_grad():
    want = mlp(torch.from_numpy(e))[:, 0].numpy()
  got = np.asarray(jax.jit(lambda m, x: m(x))(head, e))
  err = float(np.max(np.abs(got - want)))
  print("| embeddings | max abs diff (ours - torch) | mean score (torch) | mean score (ours) |")
  print("|---|---|---|---|")
  print(f"| {args.n} | {err:.2e} | {want.mean():.4f} | {got.mean():.4f} |")
  return 0 if err < 1e-5 else 1


if __name__ == "__main__":
  record = LoadRecord()
  code = main()
  record.done()
  sys.exit(code)
