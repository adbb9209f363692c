"""Loading CLIP checkpoints (Hugging Face folders, OpenCLIP safetensors) into ``clip.py`` models.

``from_transformers(folder)`` dispatches on ``config.json``'s ``architectures`` (CLIPTextModel,
CLIPTextModelWithProjection, CLIPVisionModelWithProjection, CLIPModel). ``from_open_clip(file,
config)`` reads an OpenCLIP/OpenAI-naming safetensors file with an OpenCLIP model config (a name
from ``OPENCLIP_CONFIGS`` or the dict of an OpenCLIP ``model_configs/*.json``). Parameters are
created abstractly and filled straight from the memory-mapped file with their target sharding.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax.numpy as jnp
from flax import nnx

from didr_jax.models import clip_mapping as cm
from didr_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                  CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel)
from didr_jax.sharding import abstract_model, get_rules, model_context, single_device_mesh
from didr_jax.weights import load_state, read_safetensors, read_weights_folder

HF_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection",
                    "CLIPVisionModelWithProjection", "CLIPModel")

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for fields a config.json
# omits (tests/test_clip.py pins them against the installed transformers).
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                          num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                          image_size=224, patch_size=32, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5)
HF_CLIP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

# OpenCLIP model configs (open_clip/model_configs/*.json) used by the project's rewards.
OPENCLIP_CONFIGS = {
    # HPSv2 / HPSv2.1 (exact GELU)
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                              "layers": 24}},
    # OpenAI ViT-L/14 weights need QuickGELU
    "ViT-L-14-quickgelu": {"embed_dim": 768, "quick_gelu": True,
                           "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024,
                                          "patch_size": 14},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768,
                                        "heads": 12, "layers": 12}},
}
_OPENCLIP_VISION_FIELDS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
_OPENCLIP_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


class CheckpointArchitectureError(ValueError):
  """The folder or file holds a model of another architecture than the one asked for."""


def _hf_act(d, where):
  act = d.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"{where}: hidden_act {act!r} unsupported (quick_gelu or gelu)")
  return act


def hf_text_config(d: dict, *, projection_dim: int | None, where: str = "config") -> CLIPTextConfig:
  d = {**HF_TEXT_DEFAULTS, **d}
  eos = int(d["eos_token_id"])
  return CLIPTextConfig(
      vocab_size=d["vocab_size"], width=d["hidden_size"], layers=d["num_hidden_layers"],
      heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
      max_positions=d["max_position_embeddings"], act=_hf_act(d, where), ln_eps=d["layer_norm_eps"],
      projection_dim=projection_dim, pooling="argmax" if eos == 2 else "eos", eos_token_id=eos)


def hf_vision_config(d: dict, *, projection_dim: int | None, where: str = "config") -> CLIPVisionConfig:
  d = {**HF_VISION_DEFAULTS, **d}
  if d["num_channels"] != 3:
    raise ValueError(f"{where}: vision num_channels {d['num_channels']} unsupported (3)")
  return CLIPVisionConfig(
      image_size=d["image_size"], patch_size=d["patch_size"], width=d["hidden_size"],
      layers=d["num_hidden_layers"], heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
      act=_hf_act(d, where), ln_eps=d["layer_norm_eps"], projection_dim=projection_dim)


def hf_clip_config(d: dict, where: str = "config") -> CLIPConfig:
  d = {**HF_CLIP_DEFAULTS, **d}
  proj = d["projection_dim"]
  return CLIPConfig(text=hf_text_config(d.get("text_config") or {}, projection_dim=proj, where=where),
                    vision=hf_vision_config(d.get("vision_config") or {}, projection_dim=proj,
                                            where=where),
                    logit_scale_init=d["logit_scale_init_value"])


def openclip_config(cfg: str | dict, where: str = "OpenCLIP config") -> CLIPConfig:
  """Our CLIPConfig from an OpenCLIP model-config name or dict (fields we do not model raise)."""
  if isinstance(cfg, str):
    if cfg not in OPENCLIP_CONFIGS:
      raise ValueError(f"{where}: OpenCLIP config {cfg!r} unknown; choose one of "
                       f"{sorted(OPENCLIP_CONFIGS)} or pass the model_configs JSON dict")
    cfg = OPENCLIP_CONFIGS[cfg]
  unknown = set(cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
  v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
  unknown |= {f"vision_cfg.{k}" for k in set(v) - _OPENCLIP_VISION_FIELDS}
  unknown |= {f"text_cfg.{k}" for k in set(t) - _OPENCLIP_TEXT_FIELDS}
  if unknown:
    raise ValueError(f"{where}: OpenCLIP config fields {sorted(unknown)} are not supported "
                     "by didr_jax's CLIP")
  act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
  e = cfg["embed_dim"]
  vw, tw = v.get("width", 768), t.get("width", 512)
  vision = CLIPVisionConfig(
      image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16), width=vw,
      layers=v.get("layers", 12), heads=vw // v.get("head_width", 64),
      mlp_dim=int(vw * v.get("mlp_ratio", 4.0)), act=act, ln_eps=1e-5, projection_dim=e)
  text = CLIPTextConfig(
      vocab_size=t.get("vocab_size", 49408), width=tw, layers=t.get("layers", 12),
      heads=t.get("heads", 8), mlp_dim=int(tw * t.get("mlp_ratio", 4.0)),
      max_positions=t.get("context_length", 77), act=act, ln_eps=1e-5, projection_dim=e,
      pooling="argmax")
  return CLIPConfig(text=text, vision=vision)


def read_config_json(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: config.json not found (is {folder!r} a transformers model folder?)")
  with open(path) as f:
    return json.load(f)


def materialise(make: Callable[[], nnx.Module], tensors, table, what, mesh=None, rules=None):
  """Create ``make()`` abstractly (sharded per ``rules``) and fill it from ``tensors`` via ``table``."""
  mesh = mesh if mesh is not None else single_device_mesh()
  rules = rules if rules is not None else get_rules("replicated")
  graphdef, abs_state = abstract_model(make, mesh, rules)
  state = load_state(abs_state, tensors, table, what=what)
  with model_context(mesh, rules):
    return nnx.merge(graphdef, state)


def from_transformers(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                      rules=None, attention: str = "xla", remat: str = "none"):
  """A transformers CLIP folder (config.json + model.safetensors[.index.json]) as our module."""
  d = read_config_json(folder)
  where = os.path.join(folder, "config.json")
  archs = d.get("architectures") or [d.get("_class_name")]
  arch = archs[0] if archs else None
  if arch not in HF_ARCHITECTURES:
    hint = " (a diffusers folder: use didr_jax.models.from_diffusers)" if "_class_name" in d else ""
    raise CheckpointArchitectureError(
        f"{where}: architecture {arch!r} is not supported by from_transformers; expected one of "
        f"{HF_ARCHITECTURES}{hint}")
  tensors = cm.drop_hf_buffers(read_weights_folder(folder, "model"))
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  if arch == "CLIPModel":
    cfg = hf_clip_config(d, where)
    make, table = lambda: CLIPModel(cfg, rngs=nnx.Rngs(0), **kw), cm.hf_clip_rules(cfg)
  elif arch == "CLIPVisionModelWithProjection":
    cfg = hf_vision_config(d, projection_dim=d.get("projection_dim", 512), where=where)
    make, table = lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0), **kw), cm.hf_vision_rules(cfg)
  else:
    with_proj = arch == "CLIPTextModelWithProjection"
    cfg = hf_text_config(d, projection_dim=d.get("projection_dim", 512) if with_proj else None,
                         where=where)
    # transformers 5 writes bare CLIPTextModel keys without the 'text_model.' prefix; 4.x files and
    # WithProjection models keep it (docs/models.md, "CLIP text encoders and towers").
    src = "text_model." if "text_model.embeddings.token_embedding.weight" in tensors else ""
    cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
    make = lambda: cls(cfg, rngs=nnx.Rngs(0), **kw)
    table = cm.hf_text_rules(cfg, src=src, projection_key="text_projection.weight")
  return materialise(make, tensors, table, folder, mesh, rules)


# Wrappers some training scripts put around a state dict (flattened by the pickle converter).
_WRAPPER_PREFIXES = ("state_dict.", "module.")


def _unwrap(tensors: dict) -> dict:
  for prefix in _WRAPPER_PREFIXES:
    if tensors and all(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items()}
  return tensors


def from_open_clip(path: str, config: str | dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   mesh=None, rules=None, attention: str = "xla", remat: str = "none") -> CLIPModel:
  """An OpenCLIP/OpenAI-naming ``.safetensors`` file (e.g. converted HPS_v2.1_compressed.pt)."""
  tensors = cm.drop_openclip_buffers(_unwrap(read_safetensors(path)))
  markers = ("visual.conv1.weight", "token_embedding.weight", "transformer.resblocks.0.attn.in_proj_weight")
  absent = [k for k in markers if k not in tensors]
  if absent:
    raise CheckpointArchitectureError(
        f"{path}: not an OpenCLIP/OpenAI ViT CLIP checkpoint (missing {absent}; first keys: "
        f"{sorted(tensors)[:5]})")
  cfg = openclip_config(config, where=path)
  kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat)
  return materialise(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0), **kw), tensors,
                      cm.openclip_clip_rules(cfg), path, mesh, rules)
