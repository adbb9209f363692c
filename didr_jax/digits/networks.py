"""Networks of the digits experiment.

* :class:`LabelConditionedUNet` - the project's ``UNet2DConditionModel`` with the class label as
  ``label_tokens`` learned embedding tokens fed through cross-attention (``encoder_hidden_states``,
  the text-conditioning code path); label ``NULL_LABEL`` is CFG's unconditional input. The same
  module is the reference, the TA and the one-step generator.
* three classifiers of native 8x8 images, each trained here on the train split: a CNN (the
  training reward), an MLP (the held-out reward), and a feature CNN with a low-dimensional
  bottleneck (the Frechet-distance / precision-recall feature space).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.digits.data import NUM_CLASSES
from didr_jax.models import layers
from didr_jax.models.unet import UNet2DConditionModel, UNetConfig

CLASSIFIER_KINDS = ("cnn", "mlp")


def unet_config(u, resolution: int) -> UNetConfig:
  """A small 2-level (3 at 16x16) UNet: DownBlock2D then cross-attention blocks, optionally a mid
  block with cross-attention; ``u`` has width, layers_per_block, heads, cross_attention_dim,
  norm_groups, mid_block."""
  levels = 2 if resolution == 8 else 3
  boc = tuple(u.width * min(2 ** i, 4) for i in range(levels))
  down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
  return UNetConfig(sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=boc,
                    layers_per_block=u.layers_per_block, attention_head_dim=u.heads,
                    cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_groups,
                    down_block_types=down, up_block_types=tuple(reversed(
                        [t.replace("Down", "Up") for t in down])),
                    mid_block_type="UNetMidBlock2DCrossAttn" if u.mid_block else None)


class LabelConditionedUNet(nnx.Module):
  """eps_hat(x_t, t, label): labels [B] int in 0..NUM_CLASSES (NUM_CLASSES = no label)."""

  def __init__(self, config: UNetConfig, label_tokens: int, *, rngs: nnx.Rngs):
    self.tokens, self.dim = label_tokens, config.cross_attention_dim
    self.label_embedding = layers.embedding(NUM_CLASSES + 1, label_tokens * self.dim, rngs=rngs)
    self.unet = UNet2DConditionModel(config, rngs=rngs)

  def __call__(self, x, t, labels):
    context = self.label_embedding(labels).reshape(labels.shape[0], self.tokens, self.dim)
    return self.unet(x, t, context)


class CNNClassifier(nnx.Module):
  """conv3x3(w) -> conv3x3(w, stride 2) -> conv3x3(2w, stride 2) -> dense(feature_dim) -> logits.

  ``features(x)`` is the SiLU output of the bottleneck dense layer."""

  def __init__(self, width: int, feature_dim: int, *, rngs: nnx.Rngs):
    self.c1 = layers.conv(1, width, 3, rngs=rngs)
    self.c2 = layers.conv(width, width, 3, stride=2, rngs=rngs)
    self.c3 = layers.conv(width, 2 * width, 3, stride=2, rngs=rngs)
    self.bottleneck = layers.dense(2 * width * 4, feature_dim, rngs=rngs)
    self.head = layers.dense(feature_dim, NUM_CLASSES, rngs=rngs)

  def features(self, x):
    h = nnx.silu(self.c1(x))
    h = nnx.silu(self.c2(h))
    h = nnx.silu(self.c3(h))
    return nnx.silu(self.bottleneck(h.reshape(h.shape[0], -1)))

  def __call__(self, x):
    return self.head(self.features(x))


class MLPClassifier(nnx.Module):
  """Flattened pixels -> width -> feature_dim (SiLU) -> logits."""

  def __init__(self, width: int, feature_dim: int, *, rngs: nnx.Rngs):
    self.h1 = layers.dense(64, width, rngs=rngs)
    self.h2 = layers.dense(width, feature_dim, rngs=rngs)
    self.head = layers.dense(feature_dim, NUM_CLASSES, rngs=rngs)

  def features(self, x):
    h = nnx.silu(self.h1(x.reshape(x.shape[0], -1)))
    return nnx.silu(self.h2(h))

  def __call__(self, x):
    return self.head(self.features(x))


def make_classifier(c, seed: int) -> nnx.Module:
  """A classifier from a config group with kind (cnn|mlp), width, feature_dim."""
  cls = {"cnn": CNNClassifier, "mlp": MLPClassifier}[c.kind]
  return cls(c.width, c.feature_dim, rngs=nnx.Rngs(seed))


def label_log_prob(logits, labels):
  """log p(label | x) per sample, [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def init_on_host(make_model, mesh, rules, seed: int):
  """(graphdef, params) with parameters drawn on the host, each placed with its target sharding.

  Tracing and compiling the modules' own initialisers costs about a minute of CPU for the UNet;
  drawing on the host costs nothing. By parameter name: biases 0, norm scales 1, embeddings
  N(0, 0.02^2), kernels N(0, 1 / fan_in) (fan_in = product of all but the last axis: dense
  (in, out) and conv HWIO), i.e. the variance of Flax's default lecun_normal.
  """
  import numpy as np
  from didr_jax import sharding
  graphdef, abstract = sharding.abstract_model(make_model, mesh, rules)
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]
    if "bias" in name:
      value = np.zeros(leaf.shape)
    elif "scale" in name:
      value = np.ones(leaf.shape)
    elif "embedding" in name or len(leaf.shape) < 2:
      value = 0.02 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jax.device_put(value.astype(leaf.dtype), leaf.sharding)
  return graphdef, jax.tree_util.tree_map_with_path(init, abstract)
