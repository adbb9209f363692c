"""SDXL one-step generator alignment (DI / DI++ / DI* / DIDR), see README.md "Text-to-image alignment".

  python -m didr_jax.main --config=configs/sdxl.py:tiny --workdir=runs/tiny      # random tiny models, CPU
  python -m didr_jax.main --config=configs/sdxl.py --workdir=runs/sdxl \
      --config.model.reference=/models/stable-diffusion-xl-base-1.0 \
      --config.model.generator=/models/dmd2-sdxl-1step-unet \
      --config.reward.path=/models/PickScore_v1 --config.data.prompts=/data/prompts.txt \
      --config.method=didr --config.objective.beta=0.01
"""
from didr_jax.pipelines.config import base_config


def get_config(arg: str = ""):
  return base_config("sdxl", arg or "run")
