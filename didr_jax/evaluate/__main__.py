"""Score a folder of sampled images.

  python -m didr_jax.evaluate --images=DIR --metrics=pickscore:/m/PickScore_v1,... \
      [--protocol=plain|hpsv2.1|parti|coco] [--prompts=PartiPrompts.tsv] --out=DIR [--batch=16]

``--images`` is a ``python -m didr_jax.sample`` folder (its ``index.jsonl``); for ``hpsv2.1`` the
folder of the four style folders. Metrics and their options: ``didr_jax/evaluate/metrics.py``;
protocols: ``didr_jax/evaluate/protocols.py``. Writes ``scores.csv`` (file, prompt, one column per
per-image metric), ``results.json`` and ``results.md``. Bad input (an unknown metric or protocol,
a missing path, images missing for listed prompts) is one line and exit code 2, before any model
is loaded.
"""
from __future__ import annotations

from absl import flags, logging

from didr_jax import cli, log

_IMAGES = flags.DEFINE_string("images", None, "A sampled folder (index.jsonl + PNGs).")
_METRICS = flags.DEFINE_string("metrics", None, "NAME:PATH[:KEY=VALUE...],... (didr_jax/evaluate/metrics.py).")
_PROTOCOL = flags.DEFINE_string("protocol", "plain", "plain, hpsv2.1, parti or coco.")
_PROMPTS = flags.DEFINE_string("prompts", None, "parti: the PartiPrompts TSV the images were sampled from.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per model call.")


def main(argv):
  from didr_jax.errors import ConfigError
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  for name, flag in (("--images", _IMAGES), ("--out", _OUT)):
    if not flag.value:
      raise ConfigError(f"{name}: required")
  if _BATCH.value < 1:
    raise ConfigError(f"--batch={_BATCH.value}: expected >= 1")
  from didr_jax.evaluate import metrics, runner
  specs = metrics.parse_specs(_METRICS.value)
  result = runner.evaluate(_IMAGES.value, specs, _PROTOCOL.value, _OUT.value, batch=_BATCH.value,
                           prompts_file=_PROMPTS.value)
  log.info("%s", runner.markdown(result))
  log.info("done: results in %s", _OUT.value)
  return 0


if __name__ == "__main__":
  cli.run(main)
