"""A tiny ImageReward in PyTorch, from real implementations of its two towers, saved in the
original ``ImageReward.pt`` naming.

ImageReward's BLIP ``vit.py`` is timm's VisionTransformer (same module names: ``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``; forward = final norm over all tokens), and its ``med.py`` BertModel is what transformers
ported as ``BlipTextModel`` (same key names, encoder mode with cross-attention). So the reference
is timm's ViT + transformers' BlipTextModel + ImageReward's MLP, with ImageReward's score formula.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import torch

from tests import reward_torch as rt
from didr_jax.weights.safetensors_io import write_safetensors

WORDS = ["a", "photo", "of", "cat", "red", "##s", "the", "astronaut", "riding", "horse", "on",
         "moon", "dog", "blue", ",", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
MEAN, STD = 0.16717362830052426, 1.0333394966054072
VIT = dict(image_size=32, patch_size=4, width=32, layers=2, heads=4, mlp_dim=128)
BERT = dict(vocab_size=len(VOCAB) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-12,
            hidden_act="gelu", pad_token_id=0)


class TinyImageReward(torch.nn.Module):
  def __init__(self, vit=None, bert=None):
    super().__init__()
    vit, bert = vit or VIT, bert or BERT
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel
    self.image_size = vit["image_size"]
    self.visual_encoder = VisionTransformer(
        img_size=vit["image_size"], patch_size=vit["patch_size"], embed_dim=vit["width"],
        depth=vit["layers"], num_heads=vit["heads"], mlp_ratio=vit["mlp_dim"] / vit["width"],
        qkv_bias=True, class_token=True, global_pool="", num_classes=0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    cfg = BlipTextConfig(encoder_hidden_size=vit["width"], bos_token_id=None, sep_token_id=None,
                         **bert)
    self.text_encoder = BlipTextModel(cfg, add_pooling_layer=False)
    self.mlp = rt.aesthetic_mlp(bert["hidden_size"])

  def score(self, pixels_nchw_m11, ids):
    x = rt.preprocess(pixels_nchw_m11, self.image_size, "crop")
    tokens = self.visual_encoder.forward_features(x)
    ids = torch.from_numpy(np.asarray(ids, np.int64))
    out = self.text_encoder(input_ids=ids, attention_mask=(ids != 0).long(),
                            encoder_hidden_states=tokens,
                            encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long))
    return ((self.mlp(out.last_hidden_state[:, 0]) - MEAN) / STD)[:, 0]


def build(folder, seed=0, vit=None, bert=None):
  """Write ImageReward.safetensors (+ unused vision_proj/text_proj/position_ids as in the real
  file), med_config.json and vocab.txt into ``folder``; return the torch model."""
  vit, bert = vit or VIT, bert or BERT
  torch.manual_seed(seed)
  model = TinyImageReward(vit, bert).eval()
  with torch.no_grad():  # non-trivial LN affines / biases so the mapping is really exercised
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  sd = {f"blip.visual_encoder.{k}": v for k, v in model.visual_encoder.state_dict().items()}
  sd.update({f"blip.text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
  sd.update({f"mlp.{k}": v for k, v in model.mlp.state_dict().items()})
  sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(bert["max_position_embeddings"])[None]
  sd.update({"blip.vision_proj.weight": torch.randn(8, vit["width"]), "blip.vision_proj.bias": torch.zeros(8),
             "blip.text_proj.weight": torch.randn(8, bert["hidden_size"]), "blip.text_proj.bias": torch.zeros(8)})
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, "ImageReward.safetensors"),
                    {k: v.detach().numpy() for k, v in sd.items()})
  med = {**bert, "architectures": ["BertModel"], "model_type": "bert", "add_cross_attention": True,
         "encoder_width": 768, "type_vocab_size": 2}
  with open(os.path.join(folder, "med_config.json"), "w") as f:
    json.dump(med, f)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  return model


def vision_config(vit=None):
  from didr_jax.models.blip import BLIPViTConfig
  return BLIPViTConfig(**(vit or VIT))
