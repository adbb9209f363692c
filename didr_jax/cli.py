"""What every ``python -m didr_jax.<tool>`` shares: flag parsing that turns bad input into one line
and exit code 2, and the multi-process setup."""
from __future__ import annotations

import os
import sys

from absl import app, flags


class ProcessFlags:
  """``--multihost`` (auto-detection: TPU pods, SLURM) or ``--coordinator_address``,
  ``--num_processes``, ``--process_id``: defined by each tool that runs on several processes."""

  def __init__(self):
    self.multihost = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with "
                                       "auto-detection (TPU pods, SLURM).")
    self.coordinator = flags.DEFINE_string("coordinator_address", None,
                                           "host:port of process 0 (explicit multi-process).")
    self.num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
    self.process_id = flags.DEFINE_integer("process_id", None, "This process's rank (explicit multi-process).")

  def initialize(self) -> None:
    initialize_distributed(self.multihost.value, self.coordinator.value, self.num_processes.value,
                           self.process_id.value)


def initialize_distributed(multihost: bool, coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Multi-process JAX before any other JAX call; errors are not caught (a silent single-host run
  would be worse than a crash)."""
  import jax
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif multihost:
    jax.distributed.initialize()


def input_errors():
  """Error classes that mean bad input: one line on stderr, exit code 2."""
  from didr_jax.data import PromptDataError
  from didr_jax.errors import ConfigError
  from didr_jax.training.checkpoint import CheckpointNotFoundError, ConfigMismatchError
  from didr_jax.weights import WeightFileError, WeightMismatchError
  return (ConfigError, ConfigMismatchError, CheckpointNotFoundError, PromptDataError, WeightFileError,
          WeightMismatchError)


def _bad_override_line(argv, err) -> str:
  """One line naming the offending --config.* override and the parser's reason."""
  reason = str(err).replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
  reason = " ".join(reason.strip("'\" ").split())
  for arg in argv[1:]:
    if arg.startswith("--config."):
      field = arg[2:].split("=", 1)[0]
      if any(part in reason for part in field.split(".")[1:]):
        return f"{field}: invalid override ({reason})"
  return f"invalid flags ({reason})"


def _config_path(argv):
  """The config file named by --config (without its ':arg'), or None."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _raised_in(exc, path) -> bool:
  """Whether ``exc`` was raised while running the code of file ``path``."""
  target, tb = os.path.abspath(path), exc.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      return True
    tb = tb.tb_next
  return False


def parse_flags(argv):
  """absl flag parsing (loads --config, applies --config.* overrides). Bad input -- a missing
  config file, a ValueError the config file raises on purpose (an unknown variant), an unknown or
  ill-typed flag or override -- is one line and exit code 2; any other exception raised inside the
  config file is a bug there and keeps its traceback."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    print(f"error: --config: no such file: {path}", file=sys.stderr)
    sys.exit(2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text:   # config_flags wraps the file's own error
      last = text.strip().splitlines()[-1].strip()
      if not last.startswith("ValueError: "):
        raise
      line = f"--config: {last[len('ValueError: '):]}"
    else:
      line = _bad_override_line(argv, e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if path is not None and _raised_in(e, path):
      raise
    line = _bad_override_line(argv, e)
  print(f"error: {line}", file=sys.stderr)
  sys.exit(2)


def run(main, argv=None):
  """``app.run(main)`` with :func:`parse_flags`; an input error raised by ``main`` is one line on
  stderr and exit code 2."""
  try:
    app.run(main, argv=argv, flags_parser=parse_flags)
  except ValueError as e:
    if isinstance(e, input_errors()):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise
