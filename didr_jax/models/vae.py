"""Flax NNX port of diffusers' ``AutoencoderKL`` (SD / SDXL / FLUX-format VAEs), NHWC.

``vae.encode(x)`` returns the **unscaled** posterior mean (the raw VAE latent z_vae); diffusion
models work on ``vae.scale_latents(z_vae) = scaling_factor * (z_vae - shift_factor)``, and
``vae.decode(z_vae)`` expects the unscaled latent again (``vae.unscale_latents`` inverts the map).
Images are [B, H, W, 3] in [-1, 1]. All VAE norms use epsilon 1e-6 (hard-coded in diffusers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import layers
from didr_jax.models.unet import DiffusersConfig, unsupported
from didr_jax.models.unet_blocks import (
    Attention, Downsample2D, ResnetBlock2D, Upsample2D, _Opts, call_block, model_options)

VAE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig(DiffusersConfig):
  """The fields of diffusers' ``AutoencoderKL`` config.json (defaults as in diffusers)."""
  CLASS_NAME = "AutoencoderKL"
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ("DownEncoderBlock2D",)
  up_block_types: tuple = ("UpDecoderBlock2D",)
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Any = None
  latents_std: Any = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def validate(self):
    """Raise naming the field this port does not implement. ``latents_mean``/``latents_std``
    and ``force_upcast`` are metadata used by pipelines, not by the module itself."""
    what, n = "AutoencoderKL", len(self.block_out_channels)
    for field, allowed in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
      value = getattr(self, field)
      if len(value) != n or any(t != allowed for t in value):
        unsupported(what, field, value, f"needs {n} x {allowed!r}")
    if self.act_fn != "silu":
      unsupported(what, "act_fn", self.act_fn, "only 'silu' implemented")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        unsupported(what, "norm_num_groups", self.norm_num_groups,
                    f"must divide every block_out_channels entry ({c})")
    if not isinstance(self.layers_per_block, int):
      unsupported(what, "layers_per_block", self.layers_per_block, "must be an int")


class VAEMidBlock(nnx.Module):
  """diffusers ``UNetMidBlock2D`` without time embedding: resnet -> spatial attention -> resnet."""

  def __init__(self, channels: int, *, groups: int, add_attention: bool, opts: _Opts,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=VAE_EPS,
                      opts=opts, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([
        Attention(channels, heads=1, head_dim=channels, bias=True, group_norm_groups=groups,
                  eps=VAE_EPS, opts=opts, rngs=rngs)]) if add_attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class VAEBlock(nnx.Module):
  """``DownEncoderBlock2D`` (``down=True``) or ``UpDecoderBlock2D``: resnets then a resampler."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, resample: bool, down: bool,
               groups: int, opts: _Opts, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                      eps=VAE_EPS, opts=opts, rngs=rngs) for i in range(num_layers)])
    self.down = down
    if down:
      self.downsamplers = nnx.List([Downsample2D(cout, padding=0, opts=opts, rngs=rngs)
                                   ]) if resample else None
    else:
      self.upsamplers = nnx.List([Upsample2D(cout, opts=opts, rngs=rngs)]) if resample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    samplers = self.downsamplers if self.down else self.upsamplers
    return samplers[0](x) if samplers is not None else x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, opts: _Opts, remat: str, rngs: nnx.Rngs):
    boc, g = cfg.block_out_channels, cfg.norm_num_groups
    self.remat = remat
    self.conv_in = layers.conv(cfg.in_channels, boc[0], 3, rngs=rngs, **opts.kw)
    self.down_blocks = nnx.List([
        VAEBlock(boc[max(i - 1, 0)], boc[i], num_layers=cfg.layers_per_block,
                 resample=i < len(boc) - 1, down=True, groups=g, opts=opts, rngs=rngs)
        for i in range(len(boc))])
    self.mid_block = VAEMidBlock(boc[-1], groups=g, add_attention=cfg.mid_block_add_attention,
                                 opts=opts, rngs=rngs)
    self.conv_norm_out = layers.group_norm(boc[-1], g, VAE_EPS, rngs=rngs, **opts.kw)
    self.conv_out = layers.conv(boc[-1], 2 * cfg.latent_channels, 3, rngs=rngs, **opts.kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = call_block(block, self.remat, x)
    x = call_block(self.mid_block, self.remat, x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, opts: _Opts, remat: str, rngs: nnx.Rngs):
    rboc, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.remat = remat
    self.conv_in = layers.conv(cfg.latent_channels, rboc[0], 3, rngs=rngs, **opts.kw)
    self.mid_block = VAEMidBlock(rboc[0], groups=g, add_attention=cfg.mid_block_add_attention,
                                 opts=opts, rngs=rngs)
    self.up_blocks = nnx.List([
        VAEBlock(rboc[max(i - 1, 0)], rboc[i], num_layers=cfg.layers_per_block + 1,
                 resample=i < len(rboc) - 1, down=False, groups=g, opts=opts, rngs=rngs)
        for i in range(len(rboc))])
    self.conv_norm_out = layers.group_norm(rboc[-1], g, VAE_EPS, rngs=rngs, **opts.kw)
    self.conv_out = layers.conv(rboc[-1], cfg.out_channels, 3, rngs=rngs, **opts.kw)

  def __call__(self, z):
    x = call_block(self.mid_block, self.remat, self.conv_in(z))
    for block in self.up_blocks:
      x = call_block(block, self.remat, x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """KL autoencoder; ``attention``: xla|jax|cudnn|splash, ``remat`` per block as in the UNet."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "xla", remat: str = "none", rngs: nnx.Rngs):
    opts = model_options(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                         remat=remat)
    self.config, self.dtype = config, dtype
    lat = config.latent_channels
    self.encoder = Encoder(config, opts=opts, remat=remat, rngs=rngs)
    self.decoder = Decoder(config, opts=opts, remat=remat, rngs=rngs)
    self.quant_conv = (layers.conv(2 * lat, 2 * lat, 1, rngs=rngs, **opts.kw)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(lat, lat, 1, rngs=rngs, **opts.kw)
                            if config.use_post_quant_conv else None)

  def encode_moments(self, x):
    """(mean, logvar) of the diagonal Gaussian posterior; logvar clamped to [-30, 20]."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x):
    """Unscaled latent mean (diffusers ``latent_dist.mean``); see ``scale_latents``."""
    return self.encode_moments(x)[0]

  def decode(self, z):
    """Image from an unscaled latent (diffusers ``vae.decode(z).sample``)."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x))

  def scale_latents(self, z):
    """z_model = scaling_factor * (z_vae - shift_factor): what the UNet sees."""
    return self.config.scaling_factor * (z - (self.config.shift_factor or 0.0))

  def unscale_latents(self, z):
    return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)
