"""SD1.5 one-step generator alignment (DI / DI++ / DI* / DIDR), see README.md "Text-to-image alignment".

  python -m didr_jax.main --config=configs/sd15.py:tiny --workdir=runs/tiny15
  python -m didr_jax.main --config=configs/sd15.py --config.model.reference=/models/sd15 \
      --config.model.generator=/models/dmd2-sd15-unet --config.reward.path=/models/PickScore_v1 \
      --config.data.prompts=/data/prompts.txt
"""
from didr_jax.pipelines.config import base_config


def get_config(arg: str = ""):
  return base_config("sd15", arg or "run")
