"""Flax NNX models (UNets, DiTs, VAE, text encoders) and their diffusers/transformers loaders."""


def from_diffusers(folder, **kwargs):
  """Load a diffusers-format folder (dispatch on config.json ``_class_name``)."""
  from didr_jax.models.diffusers_loading import from_diffusers as _load
  return _load(folder, **kwargs)


def to_diffusers(model, folder, **kwargs):
  """Write a diffusers-format folder (config.json + safetensors) for one of our models."""
  from didr_jax.models.diffusers_loading import to_diffusers as _save
  return _save(model, folder, **kwargs)


def text_family(folder: str) -> str:
  """"clip", "t5" or "qwen3": the family of a transformers folder, from its config.json
  (``model_type``, else the first of ``architectures``)."""
  from didr_jax.models.clip_loading import CheckpointArchitectureError, read_config_json
  d = read_config_json(folder)
  archs = d.get("architectures") or []
  key = (d.get("model_type") or (archs[0] if archs else "")).lower()
  for family in ("clip", "t5", "qwen3"):
    if key.startswith(family):
      return family
  hint = (f" ({d['_class_name']}: a diffusers folder, use didr_jax.models.from_diffusers)"
          if "_class_name" in d else "")
  raise CheckpointArchitectureError(
      f"{folder}/config.json: model_type {d.get('model_type')!r} / architectures {archs}: not a "
      f"CLIP, T5 or Qwen3 checkpoint (the text encoders from_transformers reads){hint}")


def from_transformers(folder, **kwargs):
  """Load a transformers folder: a CLIP model or text tower, a T5 encoder or a Qwen3 decoder used
  as an encoder, dispatched on its config.json."""
  family = text_family(folder)
  if family == "t5":
    from didr_jax.models.t5_mapping import from_transformers_t5 as _load
  elif family == "qwen3":
    from didr_jax.models.qwen3_mapping import from_transformers_qwen3 as _load
  else:
    from didr_jax.models.clip_loading import from_transformers as _load
  return _load(folder, **kwargs)
