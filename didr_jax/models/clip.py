"""CLIP in Flax NNX: text tower, vision tower, projections and logit scale.

One module tree serves every CLIP-based network of the project (the SD1.5/SDXL text encoders,
PickScore, HPSv2, the aesthetic tower, CLIPScore). Hugging Face and OpenCLIP checkpoints are mapped
into it by the explicit tables in ``clip_mapping.py``; attribute names follow Hugging Face. The
architecture is data (the config dataclasses below); runtime choices (dtypes, attention
implementation, remat policy) are constructor keywords. Images are NHWC and already normalised
(``didr_jax.rewards.preprocess`` does that differentiably).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax import sharding as shd
from didr_jax.models.config_fields import check_field
from didr_jax.models.attention import check_attention_impl, dot_product_attention
from didr_jax.models.layers import dense, embedding, layer_norm
from didr_jax.models.remat import REMAT_POLICIES, maybe_remat

ACTIVATIONS = ("quick_gelu", "gelu")
POOLINGS = ("argmax", "eos")
_init = nnx.initializers


_check = functools.partial(check_field, where="CLIP config")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Text tower. ``pooling``: 'argmax' pools at the largest token id (OpenCLIP, and HF configs
  with the legacy ``eos_token_id == 2``); 'eos' at the first ``eos_token_id`` (newer HF configs)."""
  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  max_positions: int = 77
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  projection_dim: int | None = None  # None: no projection (HF CLIPTextModel)
  pooling: str = "argmax"
  eos_token_id: int = 49407

  def __post_init__(self):
    _check(self.act in ACTIVATIONS, "act", f"{self.act!r} unsupported; choose one of {ACTIVATIONS}")
    _check(self.pooling in POOLINGS, "pooling", f"{self.pooling!r} unsupported; choose one of {POOLINGS}")
    _check(self.width % self.heads == 0, "heads", f"width {self.width} not divisible by {self.heads}")
    _check(self.layers >= 1, "layers", f"{self.layers} < 1")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """ViT tower: class token + patches, pre-LN, blocks, post-LN on the class token, projection."""
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  projection_dim: int | None = None

  def __post_init__(self):
    _check(self.act in ACTIVATIONS, "act", f"{self.act!r} unsupported; choose one of {ACTIVATIONS}")
    _check(self.image_size % self.patch_size == 0, "patch_size",
           f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
    _check(self.width % self.heads == 0, "heads", f"width {self.width} not divisible by {self.heads}")
    _check(self.layers >= 1, "layers", f"{self.layers} < 1")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers project into one embedding space of ``projection_dim``."""
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  logit_scale_init: float = 2.6592

  def __post_init__(self):
    _check(self.text.projection_dim is not None and
           self.text.projection_dim == self.vision.projection_dim, "projection_dim",
           f"text {self.text.projection_dim} and vision {self.vision.projection_dim} must be equal")

  @property
  def projection_dim(self) -> int:
    return self.text.projection_dim


def activation(name: str):
  if name == "quick_gelu":  # OpenAI weights
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":  # exact erf GELU (LAION ViT-H / bigG); jax's default is the tanh form
    return lambda x: jax.nn.gelu(x, approximate=False)
  raise ValueError(f"CLIP activation {name!r} unsupported; choose one of {ACTIVATIONS}")


class RuntimeOptions:
  """Runtime options shared by every submodule (not part of the architecture config)."""

  def __init__(self, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla", remat="none"):
    check_attention_impl(attention)
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {remat!r} unknown; choose one of {REMAT_POLICIES}")
    self.dtype, self.param_dtype, self.attention, self.remat = dtype, param_dtype, attention, remat

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class Attention(nnx.Module):
  def __init__(self, width, heads, *, causal, opts: RuntimeOptions, rngs):
    self.q_proj = dense(width, width, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.k_proj = dense(width, width, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.v_proj = dense(width, width, axes=("embed", "heads"), rngs=rngs, **opts.kw)
    self.out_proj = dense(width, width, axes=("heads", "embed"), rngs=rngs, **opts.kw)
    self.heads, self.causal, self.attention = heads, causal, opts.attention

  def __call__(self, x):
    b, t, c = x.shape
    split = lambda y: y.reshape(b, t, self.heads, c // self.heads)
    o = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                              implementation=self.attention, causal=self.causal)
    return self.out_proj(o.reshape(b, t, c))


class MLP(nnx.Module):
  def __init__(self, width, hidden, act, *, opts: RuntimeOptions, rngs):
    self.fc1 = dense(width, hidden, axes=("embed", "mlp"), rngs=rngs, **opts.kw)
    self.fc2 = dense(hidden, width, axes=("mlp", "embed"), rngs=rngs, **opts.kw)
    self.act = act

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LN block: x += attn(ln1(x)); x += mlp(ln2(x))."""

  def __init__(self, cfg, *, causal, opts: RuntimeOptions, rngs):
    self.layer_norm1 = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.self_attn = Attention(cfg.width, cfg.heads, causal=causal, opts=opts, rngs=rngs)
    self.layer_norm2 = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, cfg.act, opts=opts, rngs=rngs)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


def _run_layer(layer, x):
  return layer(x)


class Encoder(nnx.Module):
  def __init__(self, cfg, *, causal, opts: RuntimeOptions, rngs):
    self.layers = nnx.List([EncoderLayer(cfg, causal=causal, opts=opts, rngs=rngs)
                            for _ in range(cfg.layers)])
    self.remat = opts.remat

  def __call__(self, x):
    """(output of the last layer, output of the second-to-last layer); neither is final-LN'd."""
    run = maybe_remat(_run_layer, self.remat)
    prev = x
    for layer in self.layers:
      prev, x = x, shd.constrain_batch(run(layer, x))
    return x, prev


def _param(rngs, init, shape, axes, param_dtype):
  return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=axes)


class CLIPTextModel(nnx.Module):
  """``ids [B, T] -> (last_hidden, penultimate_hidden, pooled)``.

  ``last_hidden`` is after ``final_layer_norm`` (HF ``last_hidden_state``); ``penultimate_hidden``
  is HF ``hidden_states[-2]`` (no final LN; what SDXL feeds the UNet); ``pooled`` is the final-LN'd
  feature at the EOS position, projected when the config has ``projection_dim``.
  """

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    opts = RuntimeOptions(dtype, param_dtype, attention, remat)
    self.config = cfg
    self.dtype = dtype
    self.token_embedding = embedding(cfg.vocab_size, cfg.width, rngs=rngs, **opts.kw)
    self.position_embedding = _param(rngs, _init.normal(0.01), (cfg.max_positions, cfg.width),
                                     (None, "embed"), param_dtype)
    self.encoder = Encoder(cfg, causal=True, opts=opts, rngs=rngs)
    self.final_layer_norm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.text_projection = None if cfg.projection_dim is None else dense(
        cfg.width, cfg.projection_dim, axes=("embed", None), use_bias=False, rngs=rngs, **opts.kw)

  def pool_index(self, ids):
    if self.config.pooling == "argmax":
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == self.config.eos_token_id, axis=-1)  # first occurrence

  def __call__(self, ids):
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"CLIP text input_ids must be integer [batch, seq], got {ids.dtype}{ids.shape}")
    if ids.shape[1] > self.config.max_positions:
      raise ValueError(f"CLIP text input_ids length {ids.shape[1]} exceeds max_positions "
                       f"{self.config.max_positions}")
    pos = self.position_embedding.get_value()[:ids.shape[1]].astype(self.dtype)
    x = self.token_embedding(ids) + pos
    last, penultimate = self.encoder(x)
    last = self.final_layer_norm(last)
    pooled = jnp.take_along_axis(last, self.pool_index(ids)[:, None, None], axis=1)[:, 0]
    if self.text_projection is not None:
      pooled = self.text_projection(pooled)
    return last, penultimate, pooled


class CLIPTextModelWithProjection(CLIPTextModel):
  """The text tower whose pooled output is ``text_projection(EOS feature)`` (SDXL's bigG)."""

  def __init__(self, cfg: CLIPTextConfig, **kwargs):
    if cfg.projection_dim is None:
      raise ValueError("CLIPTextModelWithProjection needs CLIPTextConfig.projection_dim")
    super().__init__(cfg, **kwargs)


class CLIPVisionModel(nnx.Module):
  """``pixels [B, S, S, 3] (normalised) -> (last_hidden, pooled)``; pooled = post-LN class token,
  projected when the config has ``projection_dim``."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla", remat: str = "none"):
    opts = RuntimeOptions(dtype, param_dtype, attention, remat)
    self.config = cfg
    self.dtype = dtype
    p = cfg.patch_size
    self.patch_embedding = nnx.Conv(
        3, cfg.width, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(_init.lecun_normal(), (None, None, None, "embed")))
    self.class_embedding = _param(rngs, _init.normal(0.02), (cfg.width,), ("embed",), param_dtype)
    self.position_embedding = _param(rngs, _init.normal(0.01), (cfg.num_positions, cfg.width),
                                     (None, "embed"), param_dtype)
    self.pre_layernorm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.encoder = Encoder(cfg, causal=False, opts=opts, rngs=rngs)
    self.post_layernorm = layer_norm(cfg.width, cfg.ln_eps, rngs=rngs, **opts.kw)
    self.visual_projection = None if cfg.projection_dim is None else dense(
        cfg.width, cfg.projection_dim, axes=("embed", None), use_bias=False, rngs=rngs, **opts.kw)

  def __call__(self, pixels):
    s = self.config.image_size
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (s, s, 3):
      raise ValueError(f"CLIP vision input must be NHWC [batch, {s}, {s}, 3], got {pixels.shape}")
    x = self.patch_embedding(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding.get_value().astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.get_value().astype(self.dtype)
    last, _ = self.encoder(self.pre_layernorm(x))
    pooled = self.post_layernorm(last[:, 0])
    if self.visual_projection is not None:
      pooled = self.visual_projection(pooled)
    return last, pooled


class CLIPModel(nnx.Module):
  """Both towers and the learned temperature (``logit_scale`` is stored as a log)."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs, **kwargs):
    self.config = cfg
    self.text_model = CLIPTextModel(cfg.text, rngs=rngs, **kwargs)
    self.vision_model = CLIPVisionModel(cfg.vision, rngs=rngs, **kwargs)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init,
                                             kwargs.get("param_dtype", jnp.float32)))

  def encode_image(self, pixels):
    """Projected image embeddings [B, E] (not normalised)."""
    return self.vision_model(pixels)[1]

  def encode_text(self, ids):
    """Projected text embeddings [B, E] (not normalised)."""
    return self.text_model(ids)[2]

  def __call__(self, pixels, ids):
    """logits_per_image [B_img, B_txt] = exp(logit_scale) * cosine similarity."""
    img = l2_normalize(self.encode_image(pixels).astype(jnp.float32))
    txt = l2_normalize(self.encode_text(ids).astype(jnp.float32))
    return jnp.exp(self.logit_scale.get_value().astype(jnp.float32)) * img @ txt.T


def l2_normalize(x, axis=-1):
  """x / ||x|| (torch's ``x / x.norm(dim=-1, keepdim=True)``; no epsilon, like the references)."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)
