"""Explicit weight tables from Hugging Face and OpenCLIP CLIP checkpoints into ``clip.py``'s tree.

Two namings, one module tree (docs/models.md, "CLIP text encoders and towers"):

* Hugging Face ``CLIPModel`` / ``CLIPTextModel[WithProjection]`` / ``CLIPVisionModelWithProjection``
  (PickScore, openai/clip-vit-large-patch14, the SD/SDXL text encoders);
* OpenCLIP / OpenAI naming (HPSv2 and HPSv2.1 ViT-H/14 checkpoints, OpenAI ViT-L/14), where the
  attention projections are one fused ``in_proj_weight`` (3D, D) with rows [q; k; v] and the
  projections are raw (in, out) matrices applied as ``x @ proj``.

Every rule is written out; keys that are not parameters (buffers) are listed in ``IGNORED_*`` and
dropped by name, so anything else left over is reported by ``load_state``.
"""
from __future__ import annotations

import numpy as np

from didr_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from didr_jax.weights.mapping import TRANSFORMS, Rule, Transform

# Non-parameter keys: HF ``position_ids`` buffers (older files), OpenCLIP's causal ``attn_mask``
# buffer and the scalar metadata of OpenAI's JIT archives.
IGNORED_HF_SUFFIXES = (".position_ids",)
IGNORED_OPENCLIP_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def _no_export(name):
  def fail(_):
    raise ValueError(f"transform {name!r}: exporting to OpenCLIP's fused in_proj naming is not "
                     "supported (export to Hugging Face naming instead)")
  return fail


def _qkv(i, linear):
  def take(x):
    n = x.shape[0]
    if n % 3:
      raise ValueError(f"fused in_proj tensor of shape {x.shape}: first axis not divisible by 3")
    block = x[i * n // 3:(i + 1) * n // 3]
    return np.ascontiguousarray(block.T) if linear else block
  return take


# Fused OpenCLIP attention: q/k/v rows of in_proj_{weight,bias}.
for _i, _name in enumerate("qkv"):
  for _linear, _suffix in ((True, "_linear"), (False, "")):
    _key = f"in_proj_{_name}{_suffix}"
    TRANSFORMS.setdefault(_key, Transform(_qkv(_i, _linear), _no_export(_key)))


def _ln(tgt, src):
  return [Rule(f"{tgt}.scale", f"{src}.weight"), Rule(f"{tgt}.bias", f"{src}.bias")]


def _linear(tgt, src, bias=True):
  rules = [Rule(f"{tgt}.kernel", f"{src}.weight", "linear")]
  return rules + ([Rule(f"{tgt}.bias", f"{src}.bias")] if bias else [])


def _hf_blocks(tgt, src, layers):
  rules = []
  for i in range(layers):
    t, s = f"{tgt}encoder.layers.{i}", f"{src}encoder.layers.{i}"
    rules += _ln(f"{t}.layer_norm1", f"{s}.layer_norm1") + _ln(f"{t}.layer_norm2", f"{s}.layer_norm2")
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rules += _linear(f"{t}.self_attn.{p}", f"{s}.self_attn.{p}")
    rules += _linear(f"{t}.mlp.fc1", f"{s}.mlp.fc1") + _linear(f"{t}.mlp.fc2", f"{s}.mlp.fc2")
  return rules


def _openclip_blocks(tgt, src, layers):
  rules = []
  for i in range(layers):
    t, s = f"{tgt}encoder.layers.{i}", f"{src}transformer.resblocks.{i}"
    rules += _ln(f"{t}.layer_norm1", f"{s}.ln_1") + _ln(f"{t}.layer_norm2", f"{s}.ln_2")
    for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
      rules += [Rule(f"{t}.self_attn.{p}.kernel", f"{s}.attn.in_proj_weight", f"in_proj_{'qkv'[j]}_linear"),
                Rule(f"{t}.self_attn.{p}.bias", f"{s}.attn.in_proj_bias", f"in_proj_{'qkv'[j]}")]
    rules += _linear(f"{t}.self_attn.out_proj", f"{s}.attn.out_proj")
    rules += _linear(f"{t}.mlp.fc1", f"{s}.mlp.c_fc") + _linear(f"{t}.mlp.fc2", f"{s}.mlp.c_proj")
  return rules


def hf_text_rules(cfg: CLIPTextConfig, *, tgt: str = "", src: str = "",
                  projection_key: str | None = None) -> list[Rule]:
  """HF text tower; ``src`` is '' (bare 5.x files) or 'text_model.' (4.x files, WithProjection,
  CLIPModel). ``projection_key``: 'text_projection.weight' when the config projects."""
  rules = [Rule(f"{tgt}token_embedding.embedding", f"{src}embeddings.token_embedding.weight"),
           Rule(f"{tgt}position_embedding", f"{src}embeddings.position_embedding.weight")]
  rules += _hf_blocks(tgt, src, cfg.layers) + _ln(f"{tgt}final_layer_norm", f"{src}final_layer_norm")
  if cfg.projection_dim is not None:
    rules.append(Rule(f"{tgt}text_projection.kernel", projection_key or "text_projection.weight",
                      "linear"))
  return rules


def hf_vision_rules(cfg: CLIPVisionConfig, *, tgt: str = "", src: str = "vision_model.",
                    projection_key: str = "visual_projection.weight") -> list[Rule]:
  rules = [Rule(f"{tgt}patch_embedding.kernel", f"{src}embeddings.patch_embedding.weight", "conv"),
           Rule(f"{tgt}class_embedding", f"{src}embeddings.class_embedding"),
           Rule(f"{tgt}position_embedding", f"{src}embeddings.position_embedding.weight")]
  rules += _ln(f"{tgt}pre_layernorm", f"{src}pre_layrnorm")  # sic: HF's spelling
  rules += _hf_blocks(tgt, src, cfg.layers) + _ln(f"{tgt}post_layernorm", f"{src}post_layernorm")
  if cfg.projection_dim is not None:
    rules.append(Rule(f"{tgt}visual_projection.kernel", projection_key, "linear"))
  return rules


def hf_clip_rules(cfg: CLIPConfig) -> list[Rule]:
  """HF ``CLIPModel``: both prefixed towers, top-level projections and ``logit_scale``."""
  return (hf_text_rules(cfg.text, tgt="text_model.", src="text_model.",
                        projection_key="text_projection.weight")
          + hf_vision_rules(cfg.vision, tgt="vision_model.", src="vision_model.")
          + [Rule("logit_scale", "logit_scale")])


def openclip_text_rules(cfg: CLIPTextConfig, *, tgt: str = "") -> list[Rule]:
  rules = [Rule(f"{tgt}token_embedding.embedding", "token_embedding.weight"),
           Rule(f"{tgt}position_embedding", "positional_embedding")]
  rules += _openclip_blocks(tgt, "", cfg.layers) + _ln(f"{tgt}final_layer_norm", "ln_final")
  if cfg.projection_dim is not None:
    rules.append(Rule(f"{tgt}text_projection.kernel", "text_projection"))  # (W, E): x @ P
  return rules


def openclip_vision_rules(cfg: CLIPVisionConfig, *, tgt: str = "") -> list[Rule]:
  rules = [Rule(f"{tgt}patch_embedding.kernel", "visual.conv1.weight", "conv"),
           Rule(f"{tgt}class_embedding", "visual.class_embedding"),
           Rule(f"{tgt}position_embedding", "visual.positional_embedding")]
  rules += _ln(f"{tgt}pre_layernorm", "visual.ln_pre")
  rules += _openclip_blocks(tgt, "visual.", cfg.layers) + _ln(f"{tgt}post_layernorm", "visual.ln_post")
  if cfg.projection_dim is not None:
    rules.append(Rule(f"{tgt}visual_projection.kernel", "visual.proj"))  # (D, E): x @ proj
  return rules


def openclip_clip_rules(cfg: CLIPConfig) -> list[Rule]:
  return (openclip_text_rules(cfg.text, tgt="text_model.")
          + openclip_vision_rules(cfg.vision, tgt="vision_model.")
          + [Rule("logit_scale", "logit_scale")])


def drop_hf_buffers(tensors: dict) -> dict:
  return {k: v for k, v in tensors.items() if not k.endswith(IGNORED_HF_SUFFIXES)}


def drop_openclip_buffers(tensors: dict) -> dict:
  return {k: v for k, v in tensors.items() if k not in IGNORED_OPENCLIP_KEYS}
