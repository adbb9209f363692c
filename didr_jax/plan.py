"""Will a run fit, and how fast can it be? Compile its steps for a TPU topology without a TPU.

  python -m didr_jax.plan --config=configs/sdxl.py --topology=v5p:4x4x4 [--out=DIR] [--config.x=...]

Builds the run's models as shapes from the full-size configs shipped in ``didr_jax.model_configs``
(no weights are read; ``:tiny`` configs use the tiny models), places them with the run's mesh and
rules, compiles the run's TA step, generator step and outer chunk with XLA's TPU compiler
(libtpu: ``pip install 'jax[tpu]==<jax version>'``), and prints per-device memory, whether it fits,
FLOPs and a roofline step time (``didr_jax/pipelines/plan.py``); ``--out`` writes ``plan.json``.
Runs on CPU hosts: the process uses ``JAX_PLATFORMS=cpu`` and leaves any attached TPU alone.
Full-size compiles take minutes each on a CPU host.
"""
from __future__ import annotations

import os

# Deviceless: never claim an attached accelerator (a plan may run next to a training job).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from didr_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A t2i config (configs/{sdxl,sd15,pixart,zimage}.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v5e:4x4, v6e:2x4.")
_OUT = flags.DEFINE_string("out", None, "Folder for plan.json (default: print only).")
_MARGIN = flags.DEFINE_float("hbm_margin", 0.1, "Headroom a step must leave free of each chip's HBM.")
_STEPS = flags.DEFINE_list("steps", ["ta", "generator", "outer"], "Programs to compile.")
flags.mark_flags_as_required(["config", "topology"])

STEP_NAMES = ("ta", "generator", "outer")


def main(argv):
  import json
  from didr_jax import log
  from didr_jax.pipelines.plan import PlanError, plan, table
  if len(argv) > 1:
    raise PlanError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  cfg = _CONFIG.value
  if cfg.get("experiment") != "t2i":
    raise PlanError(f"config.experiment: {cfg.get('experiment')!r}; the plan compiles t2i runs")
  unknown = [s for s in _STEPS.value if s not in STEP_NAMES]
  if unknown or not _STEPS.value:
    raise PlanError(f"--steps={','.join(_STEPS.value)}: choose from {STEP_NAMES}")
  if not 0.0 <= _MARGIN.value < 1.0:
    raise PlanError(f"--hbm_margin={_MARGIN.value}: expected 0 <= margin < 1")
  result = plan(cfg, _TOPOLOGY.value, hbm_margin=_MARGIN.value, steps=tuple(_STEPS.value), log=log.info)
  result["config"] = cfg.to_dict()
  print(table(result))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "plan.json")
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    log.info("wrote %s", path)
  return 0


if __name__ == "__main__":
  cli.run(main)
