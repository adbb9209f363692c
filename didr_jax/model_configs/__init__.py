"""Full-size architecture configs of the supported checkpoints, shipped with the package so that
``python -m didr_jax.plan`` builds the real models' shapes without any weights.

The files are the ``config.json`` of the checkpoints users bring (field names and values as the
diffusers / transformers folders hold them):

* ``sdxl_unet`` / ``sdxl_vae``: stabilityai/stable-diffusion-xl-base-1.0 ``unet/`` and ``vae/``;
* ``sd15_unet`` / ``sd15_vae``: runwayml/stable-diffusion-v1-5 ``unet/`` and ``vae/``;
* ``pickscore_clip``: yuvalkirstain/PickScore_v1 (a CLIP ViT-H/14 ``CLIPModel``);
* ``pixart_transformer``: PixArt-alpha/PixArt-XL-2-1024-MS ``transformer/``;
* ``zimage_transformer``: the Z-Image transformer (diffusers' ``ZImageTransformer2DModel`` defaults:
  dim 3840, 30 layers, 2 + 2 refiner layers, caption width 2560);
* ``zimage_vae``: Z-Image's ``vae/``, the 16-channel Flux-style AutoencoderKL (no quant convs,
  scaling 0.3611, shift 0.1159).

PixArt-alpha's ``vae/`` is the SD VAE (sd-vae-ft-ema): the same architecture as ``sd15_vae``.
"""
from __future__ import annotations

import json
import os

NAMES = ("sdxl_unet", "sdxl_vae", "sd15_unet", "sd15_vae", "pickscore_clip", "pixart_transformer",
         "zimage_transformer", "zimage_vae")


def load(name: str) -> dict:
  if name not in NAMES:
    raise ValueError(f"model config {name!r} is not shipped; choose one of {NAMES}")
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.json")) as f:
    return json.load(f)
