"""Main job: ``python -m didr_jax.main --config=configs/toy.py [--workdir=...] [--config.x=...]``.

Flags and process setup only; the logic lives in importable libraries.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

from absl import app, flags, logging

from didr_jax import log
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<experiment>-<hash>).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection "
                                "(TPU pods, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank (explicit multi-process).")
flags.mark_flags_as_required(["config"])


def maybe_initialize_distributed() -> None:
  """Multi-process JAX before any other JAX call; errors are not caught (a silent single-host run
  would be worse than a crash)."""
  import jax
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def default_workdir(cfg) -> str:
  """runs/<experiment>-<variant>-<config hash>: rerunning the same command resumes it."""
  digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
  return os.path.join("runs", f"{cfg.experiment}-{cfg.get('variant', 'run')}-{digest}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg = _CONFIG.value
  maybe_initialize_distributed()
  from didr_jax.training.loop import Preempted
  if cfg.experiment == "toy":
    from didr_jax.toy import experiment, validate
    validate.validate(cfg)
    run = experiment.run
  elif cfg.experiment == "digits":
    from didr_jax.digits import experiment, validate
    validate.validate(cfg)
    run = experiment.run
  elif cfg.experiment == "t2i":
    from didr_jax.pipelines import experiment, validate
    validate.validate(cfg)
    run = experiment.run
  else:
    raise ValueError(f"config.experiment={cfg.experiment!r} unknown")
  workdir = _WORKDIR.value or default_workdir(cfg)
  log.info("workdir: %s\nconfig:\n%s", workdir, cfg)
  try:
    run(cfg, workdir)
  except Preempted as e:
    log.info("%s; rerun the same command to resume", e)
    return 0
  log.info("done: results in %s", workdir)
  return 0


def _input_errors():
  """Error classes that mean bad input: one line on stderr, exit code 2."""
  from didr_jax.data import PromptDataError
  from didr_jax.errors import ConfigError
  from didr_jax.training.checkpoint import ConfigMismatchError
  from didr_jax.weights import WeightFileError, WeightMismatchError
  return (ConfigError, ConfigMismatchError, PromptDataError, WeightFileError, WeightMismatchError)


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


def _parse_flags(argv):
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


def entry(argv=None):
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except ValueError as e:  # config and input errors: one line, non-zero exit
    if isinstance(e, _input_errors()):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise


if __name__ == "__main__":
  entry()
