"""Z-Image one-step generator alignment (DI / DI++ / DI* / DIDR) on the rectified flow, the DiT of
the DIDR paper; see README.md "Backbones".

  python -m didr_jax.main --config=configs/zimage.py:tiny --workdir=runs/tiny-zimage
  python -m didr_jax.main --config=configs/zimage.py --config.model.reference=/models/Z-Image \
      --config.model.generator=/models/Z-Image-Turbo/transformer --config.reward.path=/models/PickScore_v1 \
      --config.data.prompts=/data/prompts.txt
"""
from didr_jax.pipelines.config import base_config


def get_config(arg: str = ""):
  return base_config("zimage", arg or "run")
