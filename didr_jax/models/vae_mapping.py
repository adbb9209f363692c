"""Explicit mapping table: diffusers ``AutoencoderKL`` state dict <-> our NNX state.

Older diffusers-format VAE files name the mid-block attention ``query``/``key``/``value``/
``proj_attn`` and original-LDM ones store them as 1x1 convs; :func:`fix_legacy_vae_keys` renames
(and squeezes) those exactly as diffusers' ``_fix_state_dict_keys_on_load`` does, before the table
is applied. Export always writes the current names.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from didr_jax.models.unet_mapping import RuleBuilder
from didr_jax.models.vae import VAEConfig
from didr_jax.weights import Rule

_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def fix_legacy_vae_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename legacy mid-block attention keys and squeeze their (C, C, 1, 1) weights."""
  out = {}
  for key, value in tensors.items():
    parts = key.split(".")
    if ".mid_block.attentions." in key and len(parts) >= 2 and parts[-2] in _LEGACY:
      key = ".".join(parts[:-2] + [_LEGACY[parts[-2]], parts[-1]])
      if value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    out[key] = value
  return out


def vae_rules(cfg: VAEConfig) -> list[Rule]:
  """Every parameter of our AutoencoderKL for ``cfg``, with its diffusers key and transform."""
  r = RuleBuilder()
  boc = cfg.block_out_channels
  n = len(boc)

  def mid(p, c):
    r.resnet(f"{p}.resnets.0", c, c, time_emb=False)
    if cfg.mid_block_add_attention:
      r.norm(f"{p}.attentions.0.group_norm")
      r.attention(f"{p}.attentions.0", bias=True)
    r.resnet(f"{p}.resnets.1", c, c, time_emb=False)

  r.conv("encoder.conv_in")
  for i in range(n):
    for j in range(cfg.layers_per_block):
      r.resnet(f"encoder.down_blocks.{i}.resnets.{j}", boc[max(i - 1, 0)] if j == 0 else boc[i],
               boc[i], time_emb=False)
    if i < n - 1:
      r.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv")
  mid("encoder.mid_block", boc[-1])
  r.norm("encoder.conv_norm_out")
  r.conv("encoder.conv_out")

  rboc = tuple(reversed(boc))
  r.conv("decoder.conv_in")
  mid("decoder.mid_block", rboc[0])
  for i in range(n):
    for j in range(cfg.layers_per_block + 1):
      r.resnet(f"decoder.up_blocks.{i}.resnets.{j}", rboc[max(i - 1, 0)] if j == 0 else rboc[i],
               rboc[i], time_emb=False)
    if i < n - 1:
      r.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv")
  r.norm("decoder.conv_norm_out")
  r.conv("decoder.conv_out")
  if cfg.use_quant_conv:
    r.conv("quant_conv")
  if cfg.use_post_quant_conv:
    r.conv("post_quant_conv")
  return r.rules
