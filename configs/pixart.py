"""PixArt-alpha one-step generator alignment (DI / DI++ / DI* / DIDR), the DiT of the DI++ paper;
see README.md "Backbones".

  python -m didr_jax.main --config=configs/pixart.py:tiny --workdir=runs/tiny-pixart
  python -m didr_jax.main --config=configs/pixart.py --config.model.reference=/models/PixArt-XL-2-512x512 \
      --config.model.generator=/models/one-step-pixart-transformer --config.reward.path=/models/PickScore_v1 \
      --config.data.prompts=/data/prompts.txt
  (1024 px: a PixArt-XL-2-1024-MS reference and --config.data.resolution=1024)
"""
from didr_jax.pipelines.config import base_config


def get_config(arg: str = ""):
  return base_config("pixart", arg or "run")
