"""Our own progress/info lines (process 0, stderr), independent of absl's verbosity.

Orbax logs every checkpoint step at absl INFO; main sets absl to WARNING so that these lines are
what a user reads.
"""
from __future__ import annotations

import sys
import time

import jax


def info(msg: str, *args) -> None:
  if jax.process_index() == 0:
    text = msg % args if args else msg
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)
