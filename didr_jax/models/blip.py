"""BLIP towers used by ImageReward, in Flax NNX: a timm-style ViT and BERT with cross-attention.

* ``BLIPVisionTransformer``: conv patch embedding (with bias), class token, positions, pre-LN
  blocks (shared with CLIP: ``clip.Encoder``), then LayerNorm over **all** tokens; every token feeds
  the text encoder's cross-attention. ImageReward uses ViT-L/16 (LN eps 1e-6, exact GELU).
* ``BertCrossEncoder``: BLIP's ``med.py`` BertModel in encoder mode: post-LN BERT layers of
  self-attention (padding mask), cross-attention to the image tokens, and a GELU feed-forward.

Weight tables (ImageReward naming) live in ``didr_jax/rewards/imagereward.py``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from didr_jax.models.attention import dot_product_attention
from didr_jax.models.clip import Encoder, RuntimeOptions, activation
from didr_jax.models.layers import dense, embedding, layer_norm

_init = nnx.initializers


@dataclasses.dataclass(frozen=True)
class BLIPViTConfig:
  """Defaults: BLIP ``vit='large'`` at 224 px (ImageReward)."""
  image_size: int = 224
  patch_size: int = 16
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  act: str = "gelu"
  ln_eps: float = 1e-6

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"BLIP ViT config field 'patch_size': {self.patch_size} does not divide "
                       f"image_size {self.image_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BLIP ``med_config.json`` fields (bert-base + cross-attention); ``encoder_width`` = ViT width."""
  vocab_size: int = 30524
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  ln_eps: float = 1e-12
  act: str = "gelu"
  encoder_width: int = 1024
  pad_token_id: int = 0


class BLIPVisionTransformer(nnx.Module):
  """``pixels [B, S, S, 3] (normalised) -> tokens [B, N + 1, width]`` (final-LN'd)."""

  def __init__(self, cfg: BLIPViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    opts = RuntimeOptions(dtype, param_dtype, attention, remat)
    self.config, self.dtype = cfg, dtype
    p = cfg.patch_size
    self.patch_embed = nnx.Conv(
        3, cfg.width, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(_init.lecun_normal(), (None, None, None, "embed")),
        bias_init=nnx.with_partitioning(_init.zeros_init(), ("embed",)))
    self.cls_token = nnx.Param(_init.normal(0.02)(rngs.params(), (1, 1, cfg.width), param_dtype),
                               out_sharding=(None, None, "embed"))
    self.pos_embed = nnx.Param(
        _init.normal(0.02)(rngs.params(), (1, cfg.num_positions, cfg.width), param_dtype),
        out_sharding=(None, None, "embed"))
    self.encoder = Encoder(cfg, causal=False, opts=opts, rngs=rngs)
    self.norm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)

  def __call__(self, pixels):
    s = self.config.image_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, 3):
      raise ValueError(f"BLIP ViT input must be NHWC [batch, {s}, {s}, 3], got {pixels.shape}")
    x = self.patch_embed(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls_token.get_value().astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.get_value().astype(self.dtype)
    return self.norm(self.encoder(x)[0])


class BertAttention(nnx.Module):
  """Multi-head attention + output dense + post-LN residual (``attention`` / ``crossattention``)."""

  def __init__(self, cfg: BertConfig, kv_width: int, *, opts: RuntimeOptions, rngs):
    w = cfg.width
    self.query = dense(w, w, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.key = dense(kv_width, w, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.value = dense(kv_width, w, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.dense = dense(w, w, axes=("heads", "embed"), rngs=rngs, **opts.kw)
    self.norm = layer_norm(w, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.heads, self.attention = cfg.heads, opts.attention

  def __call__(self, x, context, mask=None):
    b, t, c = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, c // self.heads)
    o = dot_product_attention(split(self.query(x)), split(self.key(context)),
                              split(self.value(context)), implementation=self.attention, mask=mask)
    return self.norm(x + self.dense(o.reshape(b, t, c)))


class BertLayer(nnx.Module):
  def __init__(self, cfg: BertConfig, *, opts: RuntimeOptions, rngs):
    self.attention = BertAttention(cfg, cfg.width, opts=opts, rngs=rngs)
    self.crossattention = BertAttention(cfg, cfg.encoder_width, opts=opts, rngs=rngs)
    self.intermediate = dense(cfg.width, cfg.mlp_dim, axes=("embed", "mlp"), rngs=rngs, **opts.kw)
    self.output = dense(cfg.mlp_dim, cfg.width, axes=("mlp", "embed"), rngs=rngs, **opts.kw)
    self.output_norm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.act = cfg.act

  def __call__(self, x, image_tokens, mask):
    x = self.attention(x, x, mask)
    x = self.crossattention(x, image_tokens)  # every image token is attended
    return self.output_norm(x + self.output(activation(self.act)(self.intermediate(x))))


class BertCrossEncoder(nnx.Module):
  """``(ids [B, T], image tokens [B, N, encoder_width]) -> last hidden [B, T, width]``.

  The self-attention mask is ``ids != pad_token_id`` (the tokenizer pads to max_length with it)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    opts = RuntimeOptions(dtype, param_dtype, attention, remat)
    self.config, self.dtype = cfg, dtype
    self.word_embeddings = embedding(cfg.vocab_size, cfg.width, rngs=rngs, **opts.kw)
    self.position_embeddings = nnx.Param(
        _init.normal(0.02)(rngs.params(), (cfg.max_positions, cfg.width), param_dtype),
        out_sharding=(None, "embed"))
    self.embeddings_norm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.layers = nnx.List([BertLayer(cfg, opts=opts, rngs=rngs) for _ in range(cfg.layers)])

  def __call__(self, ids, image_tokens):
    if ids.ndim != 2 or ids.shape[1] > self.config.max_positions:
      raise ValueError(f"BERT input_ids must be [batch, <= {self.config.max_positions}], got {ids.shape}")
    pos = self.position_embeddings.get_value()[:ids.shape[1]].astype(self.dtype)
    x = self.embeddings_norm(self.word_embeddings(ids) + pos)
    mask = (ids != self.config.pad_token_id)[:, None, None, :]
    image_tokens = image_tokens.astype(self.dtype)
    for layer in self.layers:
      x = layer(x, image_tokens, mask)
    return x
