"""Main job: ``python -m didr_jax.main --config=configs/toy.py [--workdir=...] [--config.x=...]``.

Flags and process setup only; the logic lives in importable libraries.
"""
from __future__ import annotations

import hashlib
import json
import os

from absl import flags, logging

from didr_jax import cli, log
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<experiment>-<hash>).")
_PROCESSES = cli.ProcessFlags()
flags.mark_flags_as_required(["config"])


def default_workdir(cfg) -> str:
  """runs/<experiment>-<variant>-<config hash>: rerunning the same command resumes it."""
  digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
  return os.path.join("runs", f"{cfg.experiment}-{cfg.get('variant', 'run')}-{digest}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cfg = _CONFIG.value
  _PROCESSES.initialize()
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


def entry(argv=None):
  cli.run(main, argv)


if __name__ == "__main__":
  entry()
