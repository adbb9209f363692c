"""Flax NNX port of diffusers' ``UNet2DConditionModel`` (SD1.5 / SDXL), NHWC.

Call form: ``unet(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None)``
with ``sample`` [B, H, W, C_in], ``timestep`` a scalar or [B], ``encoder_hidden_states``
[B, T, cross_attention_dim]; SDXL (``addition_embed_type="text_time"``) also needs the pooled
``text_embeds`` [B, P] and ``time_ids`` [B, 6]. Returns [B, H, W, C_out].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import layers
from didr_jax.models.unet_blocks import (
    TimestepEmbedding, UNetDownBlock, UNetMidBlock2DCrossAttn, UNetUpBlock, call_block,
    model_options, timestep_embedding)

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def tupleize(value):
  """JSON lists -> tuples (recursively) so configs are hashable and compare equal."""
  if isinstance(value, (list, tuple)):
    return tuple(tupleize(v) for v in value)
  return value


def from_config_dict(cls, config: dict, what: str):
  """Build a frozen config dataclass from a diffusers config dict; unknown fields raise."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
  if unknown:
    raise ValueError(f"{what} config field(s) {unknown} are not supported by didr_jax")
  return cls(**{k: tupleize(v) for k, v in config.items() if k in names})


def config_to_dict(cfg, class_name: str) -> dict:
  out = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    out[f.name] = list(v) if isinstance(v, tuple) else v
  return out


class DiffusersConfig:
  """``from_dict``/``to_dict`` for frozen config dataclasses that mirror a diffusers config.json.

  Subclasses set ``CLASS_NAME`` (config.json ``_class_name``) and implement ``validate``.
  """
  CLASS_NAME = ""

  @classmethod
  def from_dict(cls, config: dict):
    cfg = from_config_dict(cls, config, cls.CLASS_NAME)
    cfg.validate()
    return cfg

  def to_dict(self) -> dict:
    return config_to_dict(self, self.CLASS_NAME)


def unsupported(what: str, field: str, value, why: str):
  raise ValueError(f"{what} config field {field}={value!r} is not supported: {why}")


def per_block(value, n: int, field: str, what: str) -> tuple:
  """An int (same for every block) or a tuple with one entry per block."""
  if isinstance(value, tuple):
    if len(value) != n:
      unsupported(what, field, value, f"needs {n} entries, one per block")
    for v in value:
      if not isinstance(v, int) or isinstance(v, bool):
        unsupported(what, field, value,
                    "entries must be ints (nested per-layer tuples are not implemented)")
    return value
  if not isinstance(value, int) or isinstance(value, bool):
    unsupported(what, field, value, "must be an int or a tuple of ints")
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig(DiffusersConfig):
  """The fields of diffusers' ``UNet2DConditionModel`` config.json (defaults as in diffusers)."""
  CLASS_NAME = "UNet2DConditionModel"
  sample_size: Any = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  only_cross_attention: Any = False
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: Any = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  dropout: float = 0.0
  act_fn: str = "silu"
  norm_num_groups: Optional[int] = 32
  norm_eps: float = 1e-5
  cross_attention_dim: Any = 1280
  transformer_layers_per_block: Any = 1
  reverse_transformer_layers_per_block: Any = None
  encoder_hid_dim: Optional[int] = None
  encoder_hid_dim_type: Optional[str] = None
  attention_head_dim: Any = 8
  num_attention_heads: Any = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  class_embed_type: Optional[str] = None
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  num_class_embeds: Optional[int] = None
  upcast_attention: Optional[bool] = False
  resnet_time_scale_shift: str = "default"
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None
  time_embedding_act_fn: Optional[str] = None
  timestep_post_act: Optional[str] = None
  time_cond_proj_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: Optional[int] = None
  attention_type: str = "default"
  class_embeddings_concat: bool = False
  mid_block_only_cross_attention: Optional[bool] = None
  cross_attention_norm: Optional[str] = None
  addition_embed_type_num_heads: int = 64

  def validate(self):
    """Raise naming the first field whose value this port does not implement.

    ``resnet_skip_time_act``, ``resnet_out_scale_factor`` and ``addition_embed_type_num_heads``
    are accepted with any value: diffusers ignores them for the block types supported here.
    ``upcast_attention`` is accepted: the ``xla`` attention always takes the softmax in float32.
    """
    what = "UNet2DConditionModel"
    n = len(self.block_out_channels)
    for field, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
      value = getattr(self, field)
      if len(value) != n:
        unsupported(what, field, value, f"needs {n} entries (len(block_out_channels))")
      for t in value:
        if t not in allowed:
          unsupported(what, field, value, f"block type {t!r} not implemented; use {allowed}")
    fixed = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn", None), "dropout": (0, 0.0),
        "act_fn": ("silu",), "num_attention_heads": (None,), "dual_cross_attention": (False,),
        "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "class_embed_type": (None,),
        "num_class_embeds": (None,), "addition_embed_type": (None, "text_time"),
        "reverse_transformer_layers_per_block": (None,), "resnet_time_scale_shift": ("default",),
        "time_embedding_type": ("positional",), "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,), "attention_type": ("default",),
        "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,), "upcast_attention": (None, False, True),
    }
    for field, allowed in fixed.items():
      if getattr(self, field) not in allowed:
        unsupported(what, field, getattr(self, field), f"only {allowed} implemented")
    oca = self.only_cross_attention
    if oca is not False and not (isinstance(oca, tuple) and not any(oca)):
      unsupported(what, "only_cross_attention", oca, "only False implemented")
    if not isinstance(self.norm_num_groups, int):
      unsupported(what, "norm_num_groups", self.norm_num_groups, "must be an int")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        unsupported(what, "norm_num_groups", self.norm_num_groups,
                    f"must divide every block_out_channels entry ({c})")
    heads = per_block(self.attention_head_dim, n, "attention_head_dim", what)
    for c, h in zip(self.block_out_channels, heads):
      if c % h:
        unsupported(what, "attention_head_dim", self.attention_head_dim,
                    f"{h} heads do not divide {c} channels")
    per_block(self.layers_per_block, n, "layers_per_block", what)
    per_block(self.cross_attention_dim, n, "cross_attention_dim", what)
    per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block", what)
    for field in ("conv_in_kernel", "conv_out_kernel"):
      k = getattr(self, field)
      if not isinstance(k, int) or k % 2 == 0:
        unsupported(what, field, k, "must be an odd int")
    if self.downsample_padding not in (0, 1):
      unsupported(what, "downsample_padding", self.downsample_padding, "only 0 or 1 implemented")
    if self.addition_embed_type == "text_time":
      for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        if not isinstance(getattr(self, field), int):
          unsupported(what, field, getattr(self, field), "text_time needs an int")

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or self.block_out_channels[0] * 4


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Channel and layer counts of one down/up block, derived exactly as diffusers does."""
  kind: str
  in_channels: int
  out_channels: int
  prev_channels: int
  num_layers: int
  cross_attention: bool
  heads: int
  transformer_layers: int
  cross_attention_dim: int
  resample: bool

  def resnet_io(self, j: int) -> tuple[int, int]:
    """(input, output) channels of resnet ``j``; up-block resnets also eat a skip."""
    first = self.prev_channels if self.kind in UP_TYPES else self.in_channels
    cin = first if j == 0 else self.out_channels
    if self.kind in UP_TYPES:
      cin += self.in_channels if j == self.num_layers - 1 else self.out_channels
    return cin, self.out_channels


def block_specs(cfg: UNetConfig):
  """(down specs, mid spec or None, up specs) following ``UNet2DConditionModel.__init__``."""
  n = len(cfg.block_out_channels)
  heads = per_block(cfg.attention_head_dim, n, "attention_head_dim", "UNet")
  lpb = per_block(cfg.layers_per_block, n, "layers_per_block", "UNet")
  cross = per_block(cfg.cross_attention_dim, n, "cross_attention_dim", "UNet")
  tlayers = per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block", "UNet")
  boc = cfg.block_out_channels
  down = []
  for i, kind in enumerate(cfg.down_block_types):
    down.append(BlockSpec(kind, boc[max(i - 1, 0)], boc[i], boc[max(i - 1, 0)], lpb[i],
                          kind == "CrossAttnDownBlock2D", heads[i], tlayers[i], cross[i],
                          i < n - 1))
  rev = lambda t: tuple(reversed(t))
  rboc, rheads, rlpb, rcross, rtl = rev(boc), rev(heads), rev(lpb), rev(cross), rev(tlayers)
  up, out_ch = [], rboc[0]
  for i, kind in enumerate(cfg.up_block_types):
    prev, out_ch = out_ch, rboc[i]
    up.append(BlockSpec(kind, rboc[min(i + 1, n - 1)], out_ch, prev, rlpb[i] + 1,
                        kind == "CrossAttnUpBlock2D", rheads[i], rtl[i], rcross[i], i < n - 1))
  mid = None
  if cfg.mid_block_type is not None:
    mid = BlockSpec(cfg.mid_block_type, boc[-1], boc[-1], boc[-1], 1, True, heads[-1], tlayers[-1],
                    cross[-1], False)
  return down, mid, up


class UNet2DConditionModel(nnx.Module):
  """SD1.5 / SDXL UNet. ``attention``: xla|jax|cudnn|splash; ``remat``: none|full|dots_no_batch|offload
  (applied per down/mid/up block)."""

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "xla", remat: str = "none", rngs: nnx.Rngs):
    opts = model_options(config, dtype=dtype, param_dtype=param_dtype, attention=attention,
                         remat=remat)
    self.config, self.dtype, self.remat = config, dtype, remat
    kw = opts.kw
    cfg, boc = config, config.block_out_channels
    temb = cfg.time_embed_dim
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    self.conv_in = layers.conv(cfg.in_channels, boc[0], cfg.conv_in_kernel, rngs=rngs, **kw)
    self.time_embedding = TimestepEmbedding(boc[0], temb, cond_proj_dim=cfg.time_cond_proj_dim,
                                            opts=opts, rngs=rngs)
    self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb,
                                            cond_proj_dim=None, opts=opts, rngs=rngs)
                          if cfg.addition_embed_type == "text_time" else None)
    down, mid, up = block_specs(cfg)
    self.down_blocks = nnx.List([
        UNetDownBlock(s, temb_channels=temb, groups=groups, eps=eps,
                      downsample_padding=cfg.downsample_padding, opts=opts, rngs=rngs)
        for s in down])
    self.mid_block = UNetMidBlock2DCrossAttn(
        mid.out_channels, heads=mid.heads, transformer_layers=mid.transformer_layers,
        cross_attention_dim=mid.cross_attention_dim, temb_channels=temb, groups=groups, eps=eps,
        output_scale_factor=cfg.mid_block_scale_factor, opts=opts, rngs=rngs) if mid else None
    self.up_blocks = nnx.List([
        UNetUpBlock(s, temb_channels=temb, groups=groups, eps=eps, opts=opts, rngs=rngs)
        for s in up])
    self.conv_norm_out = layers.group_norm(boc[0], groups, eps, rngs=rngs, **kw)
    self.conv_out = layers.conv(boc[0], cfg.out_channels, cfg.conv_out_kernel, rngs=rngs, **kw)

  def __call__(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
               timestep_cond=None):
    cfg = self.config
    b = sample.shape[0]
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep, jnp.float32), (-1,)), (b,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift).astype(self.dtype)
    emb = self.time_embedding(t_emb, timestep_cond)
    if self.add_embedding is not None:
      if text_embeds is None or time_ids is None:
        raise ValueError("addition_embed_type='text_time' needs text_embeds and time_ids")
      time_embeds = timestep_embedding(
          jnp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim,
          flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift).reshape(b, -1)
      add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_embeds], axis=-1)
      emb = emb + self.add_embedding(add.astype(self.dtype))
    context = encoder_hidden_states

    x = self.conv_in(sample)
    skips = [x]
    for block in self.down_blocks:
      x, res = call_block(block, self.remat, x, emb, context)
      skips.extend(res)
    if self.mid_block is not None:
      x = call_block(self.mid_block, self.remat, x, emb, context)
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      res, skips = tuple(skips[-n:]), skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None
      x = call_block(block, self.remat, x, res, emb, context, upsample_size=size)
    x = jax.nn.silu(self.conv_norm_out(x))
    return self.conv_out(x)
