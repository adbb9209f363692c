"""ImageReward v1.0 (THUDM): BLIP ViT-L/16 image tokens -> BERT with cross-attention over the
prompt -> [CLS] feature -> 5-Linear MLP -> ``(head - 0.16717362830052426) / 1.0333394966054072``.

Weights: ``ImageReward.pt`` converted once to safetensors (``python -m didr_jax.convert``), in the
original naming (``blip.visual_encoder.*`` timm ViT, ``blip.text_encoder.*`` BLIP med.py BERT,
``mlp.layers.{0,2,4,6,7}``), plus the ``med_config.json`` and bert-base-uncased ``vocab.txt``
shipped with it. Preprocessing is CLIP's (short side -> 224 bicubic, centre crop, OpenAI mean/std).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from didr_jax.models.blip import BertConfig, BertCrossEncoder, BLIPViTConfig, BLIPVisionTransformer
from didr_jax.models.clip_loading import CheckpointArchitectureError, materialise
import didr_jax.models.clip_mapping  # noqa: F401  (registers the fused-qkv in_proj_* transforms)
from didr_jax.rewards.clip_rewards import AestheticHead, Reward
from didr_jax.text.bert_tokenizer import load_bert_tokenizer
from didr_jax.weights import Rule, read_safetensors

MEAN, STD = 0.16717362830052426, 1.0333394966054072
# Parameters of BLIP_Pretrain that scoring never uses, and med.py's persistent position_ids buffer.
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


class ImageRewardModel(nnx.Module):
  def __init__(self, vision: BLIPViTConfig, text: BertConfig, *, rngs: nnx.Rngs, **kwargs):
    if text.encoder_width != vision.width:
      raise ValueError(f"ImageReward: BERT encoder_width {text.encoder_width} != ViT width {vision.width}")
    self.visual_encoder = BLIPVisionTransformer(vision, rngs=rngs, **kwargs)
    self.text_encoder = BertCrossEncoder(text, rngs=rngs, **kwargs)
    self.mlp = AestheticHead(text.width, rngs=rngs)

  def __call__(self, pixels, ids):
    tokens = self.visual_encoder(pixels)
    feature = self.text_encoder(ids, tokens)[:, 0].astype(jnp.float32)
    return (self.mlp(feature) - MEAN) / STD


def _ln(tgt, src):
  return [Rule(f"{tgt}.scale", f"{src}.weight"), Rule(f"{tgt}.bias", f"{src}.bias")]


def _linear(tgt, src):
  return [Rule(f"{tgt}.kernel", f"{src}.weight", "linear"), Rule(f"{tgt}.bias", f"{src}.bias")]


def imagereward_rules(vision: BLIPViTConfig, text: BertConfig) -> list[Rule]:
  """Explicit table: ImageReward.pt naming -> ImageRewardModel."""
  v, s = "visual_encoder", "blip.visual_encoder"
  rules = [Rule(f"{v}.patch_embed.kernel", f"{s}.patch_embed.proj.weight", "conv"),
           Rule(f"{v}.patch_embed.bias", f"{s}.patch_embed.proj.bias"),
           Rule(f"{v}.cls_token", f"{s}.cls_token"), Rule(f"{v}.pos_embed", f"{s}.pos_embed")]
  for i in range(vision.layers):
    t, b = f"{v}.encoder.layers.{i}", f"{s}.blocks.{i}"
    rules += _ln(f"{t}.layer_norm1", f"{b}.norm1") + _ln(f"{t}.layer_norm2", f"{b}.norm2")
    for j, p in enumerate(("q_proj", "k_proj", "v_proj")):  # fused timm qkv: rows [q; k; v]
      rules += [Rule(f"{t}.self_attn.{p}.kernel", f"{b}.attn.qkv.weight", f"in_proj_{'qkv'[j]}_linear"),
                Rule(f"{t}.self_attn.{p}.bias", f"{b}.attn.qkv.bias", f"in_proj_{'qkv'[j]}")]
    rules += _linear(f"{t}.self_attn.out_proj", f"{b}.attn.proj")
    rules += _linear(f"{t}.mlp.fc1", f"{b}.mlp.fc1") + _linear(f"{t}.mlp.fc2", f"{b}.mlp.fc2")
  rules += _ln(f"{v}.norm", f"{s}.norm")
  t, s = "text_encoder", "blip.text_encoder"
  rules += [Rule(f"{t}.word_embeddings.embedding", f"{s}.embeddings.word_embeddings.weight"),
            Rule(f"{t}.position_embeddings", f"{s}.embeddings.position_embeddings.weight")]
  rules += _ln(f"{t}.embeddings_norm", f"{s}.embeddings.LayerNorm")
  for i in range(text.layers):
    tl, sl = f"{t}.layers.{i}", f"{s}.encoder.layer.{i}"
    for part in ("attention", "crossattention"):
      for p in ("query", "key", "value"):
        rules += _linear(f"{tl}.{part}.{p}", f"{sl}.{part}.self.{p}")
      rules += _linear(f"{tl}.{part}.dense", f"{sl}.{part}.output.dense")
      rules += _ln(f"{tl}.{part}.norm", f"{sl}.{part}.output.LayerNorm")
    rules += _linear(f"{tl}.intermediate", f"{sl}.intermediate.dense")
    rules += _linear(f"{tl}.output", f"{sl}.output.dense") + _ln(f"{tl}.output_norm", f"{sl}.output.LayerNorm")
  for i, k in enumerate(AestheticHead.TORCH_INDEX):
    rules += _linear(f"mlp.layers.{i}", f"mlp.layers.{k}")
  return rules


def bert_config_from_med(path: str, encoder_width: int) -> BertConfig:
  """BertConfig from BLIP's med_config.json (``encoder_width`` is set from the ViT, as BLIP does)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: med_config.json not found (ships with ImageReward)")
  with open(path) as f:
    d = json.load(f)
  if not d.get("add_cross_attention", False):
    raise ValueError(f"{path}: 'add_cross_attention' must be true for ImageReward's BERT")
  if d.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{path}: position_embedding_type {d['position_embedding_type']!r} unsupported")
  if d.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{path}: hidden_act {d['hidden_act']!r} unsupported (gelu)")
  return BertConfig(vocab_size=d["vocab_size"], width=d["hidden_size"], layers=d["num_hidden_layers"],
                    heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
                    max_positions=d["max_position_embeddings"], ln_eps=d.get("layer_norm_eps", 1e-12),
                    encoder_width=encoder_width, pad_token_id=d.get("pad_token_id", 0))


class ImageReward(Reward):
  def __init__(self, model: ImageRewardModel, tokenizer):
    self.name, self.tokenizer = "imagereward", tokenizer
    self.image_size = model.visual_encoder.config.image_size
    self._init_apply(model)

  def score_pixels(self, params, pixels, ids):
    """Scores[B] from normalised pixels and BERT token ids [B, 35]."""
    return nnx.merge(self.graphdef, params)(pixels, ids)


def load_imagereward(path: str, *, med_config: str | None = None, tokenizer: str | None = None,
                     vision: BLIPViTConfig | None = None, mesh=None, rules=None, dtype=jnp.float32,
                     param_dtype=jnp.float32, attention: str = "xla", remat: str = "none") -> ImageReward:
  """``path``: converted ImageReward.safetensors; ``med_config`` / ``tokenizer`` default to its folder."""
  folder = os.path.dirname(os.path.abspath(path))
  vision = vision or BLIPViTConfig()
  text = bert_config_from_med(med_config or os.path.join(folder, "med_config.json"), vision.width)
  tok = load_bert_tokenizer(tokenizer or folder)
  tensors = read_safetensors(path)
  if "blip.visual_encoder.patch_embed.proj.weight" not in tensors:
    raise CheckpointArchitectureError(
        f"{path}: not an ImageReward checkpoint (no 'blip.visual_encoder.patch_embed.proj.weight'; "
        f"first keys {sorted(tensors)[:5]})")
  tensors = {k: v for k, v in tensors.items()
             if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  model = materialise(lambda: ImageRewardModel(vision, text, rngs=nnx.Rngs(0), **kw), tensors,
                      imagereward_rules(vision, text), path, mesh, rules)
  return ImageReward(model, tok)


__all__ = ["ImageReward", "ImageRewardModel", "load_imagereward", "imagereward_rules", "MEAN", "STD"]
