"""Flax NNX models (UNet, VAE, CLIP) and their diffusers/transformers weight loaders."""


def from_diffusers(folder, **kwargs):
  """Load a diffusers-format folder (dispatch on config.json ``_class_name``)."""
  from didr_jax.models.diffusers_loading import from_diffusers as _load
  return _load(folder, **kwargs)


def to_diffusers(model, folder, **kwargs):
  """Write a diffusers-format folder (config.json + safetensors) for one of our models."""
  from didr_jax.models.diffusers_loading import to_diffusers as _save
  return _save(model, folder, **kwargs)


def from_transformers(folder, **kwargs):
  """Load a transformers-format CLIP text encoder folder (CLIPTextModel[WithProjection])."""
  from didr_jax.models.clip_loading import from_transformers as _load
  return _load(folder, **kwargs)
