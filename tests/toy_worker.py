"""Subprocess worker for trainer tests: alignment steps of a tiny toy, parameters dumped to .npz.

  python tests/toy_worker.py OUT.npz --method=didr-drp --steps=4 [--ckpt=DIR] [--devices=8]
      [--rank=R --nproc=2 --port=P]   (multi-process: each rank gets --devices local CPU devices)
      [--sigterm_rank=R]   (rank R sends itself SIGTERM right after jax.distributed.initialize: JAX's
                            preemption notice, since nothing else handles SIGTERM here)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("--method", default="didr-drp")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--ckpt", default="")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--rank", type=int, default=0)
  p.add_argument("--nproc", type=int, default=1)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--sigterm_rank", type=int, default=-1)
  a = p.parse_args()
  import jax
  jax.config.update("jax_num_cpu_devices", a.devices)
  if a.nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{a.port}", num_processes=a.nproc,
                               process_id=a.rank, initialization_timeout=60)
    if a.rank == a.sigterm_rank:
      import signal
      os.kill(os.getpid(), signal.SIGTERM)
  import numpy as np
  from tests.toy_tiny import dump_state, run_alignment, tiny_config
  from didr_jax.training.loop import Preempted
  cfg = tiny_config(a.method, a.steps)
  try:
    state = run_alignment(cfg, a.method, ckpt_dir=a.ckpt or None)
  except Preempted as e:
    print("worker preempted", jax.process_index(), e, flush=True)
    return
  arrays = dump_state(state)
  if jax.process_index() == 0:
    np.savez(a.out, **arrays)
  print("worker done", jax.process_index(), jax.device_count(), flush=True)


if __name__ == "__main__":
  main()
