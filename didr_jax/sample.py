"""Sample images of a t2i model into a folder that ``python -m didr_jax.evaluate`` scores.

  python -m didr_jax.sample --workdir=RUN [--step=N] [--ema] --prompts=FILE --out=DIR
  python -m didr_jax.sample --config=configs/sdxl.py --config.model.reference=SDXL \
      --generator=FOLDER_OR_SAFETENSORS --prompts=FILE --out=DIR
  python -m didr_jax.sample --workdir=RUN --teacher_steps=50 [--guidance_scale=5] ...   # the reference

``--seeds=0,1,...`` or ``--images_per_prompt=N`` (seeds 0..N-1; default 1). ``--workdir`` restores
only the generator (or its EMA) of a training run's checkpoint and reads the run's own config; a
``:tiny`` run samples its tiny models. Deterministic for any device or host count (the seed rule is
in ``didr_jax/pipelines/sampling.py``) and resumable: existing images are kept. Bad input is one
line naming the flag, field or file, and exit code 2, before any model is built.
"""
from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from didr_jax import cli, log

_CONFIG = config_flags.DEFINE_config_file("config", None, "A t2i config (with --generator or --teacher_steps).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A t2i training run: sample its generator.")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the latest).")
_EMA = flags.DEFINE_bool("ema", False, "With --workdir: sample the generator's EMA.")
_GENERATOR = flags.DEFINE_string("generator", None, "With --config: a one-step UNet (diffusers folder or "
                                 ".safetensors in diffusers naming).")
_TEACHER = flags.DEFINE_integer("teacher_steps", 0, "Sample the reference with this many DDIM steps and CFG.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "With --teacher_steps: diffusers' guidance scale "
                               "(default 5 for SDXL, 7.5 for SD1.5).")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompt file (txt, tsv, json, jsonl).")
_FORMAT = flags.DEFINE_string("prompt_format", "auto", "Format of --prompts (auto: by suffix).")
_FIELD = flags.DEFINE_string("prompt_field", "prompt", "JSON key or TSV column of the prompt.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds of every prompt (exclusive with --images_per_prompt).")
_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", None, "Images per prompt: seeds 0..N-1 (default 1).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (a multiple of the device count; default: "
                              "one image per device).")
_PROCESSES = cli.ProcessFlags()


def _seeds() -> list[int]:
  from didr_jax.pipelines.sampling import SampleError
  if _SEEDS.value is not None and _PER_PROMPT.value is not None:
    raise SampleError("--seeds and --images_per_prompt: give one of them")
  if _SEEDS.value is not None:
    try:
      seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
      raise SampleError(f"--seeds={','.join(_SEEDS.value)}: expected integers") from None
    if not seeds or min(seeds) < 0 or max(seeds) >= 2 ** 32 or len(set(seeds)) != len(seeds):
      raise SampleError(f"--seeds={','.join(_SEEDS.value)}: expected distinct integers in [0, 2^32)")
    return seeds
  n = 1 if _PER_PROMPT.value is None else _PER_PROMPT.value
  if n < 1:
    raise SampleError(f"--images_per_prompt={n}: expected >= 1")
  return list(range(n))


def main(argv):
  from didr_jax.pipelines.sampling import SampleError
  if len(argv) > 1:
    raise SampleError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)   # orbax warns on every read-only checkpoint folder
  if (_WORKDIR.value is None) == (_CONFIG.value is None):
    raise SampleError("give exactly one of --workdir (a training run) or --config (with --generator "
                      "or --teacher_steps)")
  for name, flag in (("--prompts", _PROMPTS), ("--out", _OUT)):
    if not flag.value:
      raise SampleError(f"{name}: required")
  _PROCESSES.initialize()
  import jax
  from didr_jax.data import PromptDataError, load_prompts
  from didr_jax.errors import ConfigError
  from didr_jax.pipelines import sampling
  from didr_jax.pipelines.export_checkpoint import run_config
  try:
    cfg = run_config(_WORKDIR.value) if _WORKDIR.value else _CONFIG.value
  except ConfigError as e:
    raise SampleError(f"--workdir: {e}") from None
  if cfg.get("experiment") != "t2i":
    raise SampleError(f"config.experiment: {cfg.get('experiment')!r}; only t2i models are sampled")
  src = sampling.Source(workdir=_WORKDIR.value, step=_STEP.value, ema=_EMA.value,
                        generator=_GENERATOR.value, teacher_steps=_TEACHER.value,
                        guidance_scale=_GUIDANCE.value)
  try:
    prompts = load_prompts(_PROMPTS.value, format=_FORMAT.value, field=_FIELD.value)
  except PromptDataError as e:
    raise SampleError(f"--prompts: {e}") from None
  seeds = _seeds()
  identity = sampling.check_source(src, cfg)
  batch = _BATCH.value or jax.device_count()
  sampling.check_batch(batch)
  sampling.claim_folder(_OUT.value, identity)
  sampler = sampling.Sampler(cfg, src, batch)
  counts = sampling.sample(sampler, identity, prompts, seeds, _OUT.value)
  log.info("done: %d images in %s (%d sampled now, %d existed)", counts["images"], _OUT.value,
           counts["sampled"], counts["existing"])
  return 0


if __name__ == "__main__":
  cli.run(main)
