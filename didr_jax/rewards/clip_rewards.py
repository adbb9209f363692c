"""CLIP-family rewards: LAION aesthetic, PickScore, HPSv2 / HPSv2.1, CLIPScore.

Every reward is ``reward(images, prompts) -> scores[B]`` with images NHWC in [-1, 1]. The whole
map (preprocessing, towers, score) is one pure function of ``(params, images, token_ids)``
(``reward.apply``), jitted once, so it can sit inside ``jax.grad`` / ``jax.jit`` of a training
step. Prompts may be strings (tokenised on the host, also fine while tracing since strings are
static) or int token ids [B, T]. Text embeddings get ``stop_gradient``: rewards train pixels only.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax.models.clip import CLIPModel, l2_normalize
from didr_jax.models.clip_loading import (CheckpointArchitectureError, from_open_clip,
                                          from_transformers, materialise)
from didr_jax.models.layers import dense
from didr_jax.rewards.preprocess import check_images, clip_preprocess
from didr_jax.text import load_clip_tokenizer
from didr_jax.weights import Rule, read_safetensors

# Published scales (README.md "Rewards"): what ``__call__`` returns for each score kind.
SCORES = {
    "cosine": "cos(image, text)  (HPSv2/HPSv2.1; papers report 100 x cos)",
    "logit": "exp(logit_scale) x cos  (PickScore, ~100 x cos)",
    "clipscore": "100 x max(cos, 0)  (torchmetrics CLIPScore)",
    "aesthetic": "MLP(image_embedding / ||image_embedding||)  (LAION aesthetic v2, ~1-10)",
}


class AestheticHead(nnx.Module):
  """LAION aesthetic predictor v2 head: five Linear layers, no activations (dropouts are no-ops)."""
  DIMS = (1024, 128, 64, 16, 1)
  TORCH_INDEX = (0, 2, 4, 6, 7)  # nn.Sequential positions of the Linear layers

  def __init__(self, in_dim: int = 768, *, rngs: nnx.Rngs):
    dims = (in_dim,) + self.DIMS
    self.layers = nnx.List([dense(a, b, axes=(None, None), rngs=rngs) for a, b in zip(dims, dims[1:])])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x[..., 0]


def aesthetic_head_rules() -> list[Rule]:
  rules = []
  for i, t in enumerate(AestheticHead.TORCH_INDEX):
    rules += [Rule(f"layers.{i}.kernel", f"layers.{t}.weight", "linear"),
              Rule(f"layers.{i}.bias", f"layers.{t}.bias")]
  return rules


def load_aesthetic_head(path: str, in_dim: int = 768, *, mesh=None, rules=None) -> AestheticHead:
  """The head from a safetensors file (convert the .pth once with ``python -m didr_jax.convert``)."""
  tensors = read_safetensors(path)
  if "layers.0.weight" not in tensors:
    raise CheckpointArchitectureError(
        f"{path}: not a LAION aesthetic head (no 'layers.0.weight'; first keys {sorted(tensors)[:5]})")
  return materialise(lambda: AestheticHead(in_dim, rngs=nnx.Rngs(0)), tensors,
                     aesthetic_head_rules(), path, mesh, rules)


def load_clip(path: str, *, config=None, **kwargs) -> CLIPModel:
  """A transformers CLIPModel folder, or an OpenCLIP-naming safetensors file with ``config``."""
  if os.path.isdir(path):
    model = from_transformers(path, **kwargs)
  else:
    if config is None:
      raise ValueError(f"{path}: an OpenCLIP-naming file needs config= (e.g. 'ViT-H-14')")
    model = from_open_clip(path, config, **kwargs)
  if not isinstance(model, CLIPModel):
    raise CheckpointArchitectureError(f"{path}: holds a {type(model).__name__}; this reward needs "
                                      "a CLIPModel (both towers)")
  return model


class Reward:
  """Base: ``__call__`` validates images, tokenises string prompts, runs the jitted ``apply``.

  Subclasses set ``name``, ``tokenizer`` (None: no prompts), ``image_size``, ``mode`` (the
  reference's resize: "crop" or "pad"), ``graphdef`` / ``params`` and define the pure
  ``score_pixels(params, pixels, ids)`` on normalised model input [B, size, size, 3]. ``apply``
  (training) reaches it through the differentiable preprocessing; the evaluation path feeds it
  pixels preprocessed the official way (didr_jax/evaluate/official.py)."""
  name: str
  tokenizer = None
  mode = "crop"

  def apply(self, params, images, ids):
    """Pure scores[B] from (params, [-1, 1] images, token ids or None)."""
    return self.score_pixels(params, clip_preprocess(images, self.image_size, self.mode, check=False), ids)

  def _init_apply(self, modules):
    self.graphdef, self.params = nnx.split(modules)
    self._jitted = jax.jit(self.apply)

  def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"reward {self.name!r} takes no prompts")
    return self.tokenizer(prompts)

  def _ids(self, prompts, batch: int):
    if self.tokenizer is None:
      return None
    if prompts is None:
      raise ValueError(f"reward {self.name!r} needs prompts (strings or token ids)")
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], str)):
      ids = self.tokenize(prompts)
    else:
      ids = prompts
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"reward {self.name!r}: token ids must be integer [batch, seq], got "
                       f"{ids.dtype}{tuple(ids.shape)}")
    if ids.shape[0] == 1 and batch > 1:
      ids = jnp.broadcast_to(ids, (batch, ids.shape[1]))
    if ids.shape[0] != batch:
      raise ValueError(f"reward {self.name!r}: {ids.shape[0]} prompts for {batch} images")
    return ids

  def __call__(self, images, prompts=None):
    check_images(images, what=f"reward {self.name!r} images")
    return self._jitted(self.params, images, self._ids(prompts, images.shape[0]))


class CLIPReward(Reward):
  """A reward computed from a CLIP model's image (and text) embeddings."""

  def __init__(self, name: str, clip: CLIPModel, *, score: str, mode: str = "crop",
               tokenizer=None, head: AestheticHead | None = None):
    if score not in SCORES:
      raise ValueError(f"reward score kind {score!r} unknown; choose one of {sorted(SCORES)}")
    if score != "aesthetic" and tokenizer is None:
      raise ValueError(f"reward {name!r} needs a tokenizer")
    if score == "aesthetic" and head is None:
      raise ValueError(f"reward {name!r} needs the aesthetic head")
    self.name, self.score, self.mode, self.tokenizer = name, score, mode, tokenizer
    self.image_size = clip.config.vision.image_size
    self._init_apply((clip, head))

  def score_pixels(self, params, pixels, ids):
    clip, head = nnx.merge(self.graphdef, params)
    img = clip.encode_image(pixels).astype(jnp.float32)
    if self.score == "aesthetic":
      return head(l2_normalize(img))
    txt = jax.lax.stop_gradient(clip.encode_text(ids).astype(jnp.float32))
    cos = jnp.sum(l2_normalize(img) * l2_normalize(txt), axis=-1)
    if self.score == "cosine":
      return cos
    if self.score == "logit":
      return jnp.exp(clip.logit_scale.get_value().astype(jnp.float32)) * cos
    return 100.0 * jnp.maximum(cos, 0.0)


# Each CLIP reward's score and the resize of its reference implementation ("crop" or "pad"): the
# loaders below, the tiny pipeline and the compile plan's shape-only rewards read them here.
SCORE_AND_MODE = {"aesthetic": ("aesthetic", "crop"), "pickscore": ("logit", "crop"),
                  "hpsv2": ("cosine", "pad"), "hpsv2.1": ("cosine", "pad"),
                  "clipscore": ("clipscore", "crop"), "tiny_pickscore": ("logit", "crop")}


def clip_reward(name: str, clip: CLIPModel, **kw) -> CLIPReward:
  """``CLIPReward`` with the score and resize of reward ``name``."""
  score, mode = SCORE_AND_MODE[name]
  return CLIPReward(name, clip, score=score, mode=mode, **kw)


def _tokenizer(name, path, tokenizer):
  folder = tokenizer if tokenizer is not None else (path if os.path.isdir(path) else None)
  if folder is None:
    raise ValueError(f"reward {name!r}: pass tokenizer= (a folder with vocab.json and merges.txt)")
  return load_clip_tokenizer(folder)


def load_aesthetic(path: str, *, clip: str, clip_config="ViT-L-14-quickgelu", **kw) -> CLIPReward:
  """``path``: head safetensors; ``clip``: OpenAI ViT-L/14 (HF folder or OpenAI-naming file)."""
  model = load_clip(clip, config=clip_config, **kw)
  head = load_aesthetic_head(path, model.config.projection_dim, mesh=kw.get("mesh"), rules=kw.get("rules"))
  return clip_reward("aesthetic", model, head=head)


def load_pickscore(path: str, *, tokenizer: str | None = None, **kw) -> CLIPReward:
  """``path``: HF CLIPModel folder (yuvalkirstain/PickScore_v1)."""
  return clip_reward("pickscore", load_clip(path, **kw), tokenizer=_tokenizer("pickscore", path, tokenizer))


def load_hps(path: str, *, tokenizer: str, version: str = "hpsv2", config="ViT-H-14", **kw) -> CLIPReward:
  """``path``: converted HPS_v2[.1]_compressed.pt (OpenCLIP naming, ViT-H-14)."""
  return clip_reward(version, load_clip(path, config=config, **kw), tokenizer=_tokenizer(version, path, tokenizer))


def load_clipscore(path: str, *, tokenizer: str | None = None, config="ViT-L-14-quickgelu", **kw) -> CLIPReward:
  """``path``: openai/clip-vit-large-patch14 HF folder (torchmetrics' default) or an OpenAI file."""
  return clip_reward("clipscore", load_clip(path, config=config, **kw),
                     tokenizer=_tokenizer("clipscore", path, tokenizer))
