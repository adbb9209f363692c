"""The full-size configs shipped in ``didr_jax.model_configs`` build, in our models, exactly the
parameters diffusers / transformers build from the same files (meta device: no memory)."""
import jax
import numpy as np
import pytest

from tests.clip_torch_env import torch

pytestmark = pytest.mark.parity


def _ours(class_name, cfg):
  from didr_jax import sharding
  from didr_jax.models.diffusers_loading import abstract_for
  import jax.numpy as jnp
  _, state = abstract_for(class_name, cfg, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla",
                          remat="none", mesh=sharding.single_device_mesh(),
                          rules=sharding.get_rules("replicated"))
  return state


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["sdxl_unet", "sd15_unet", "sdxl_vae", "sd15_vae", "zimage_vae"])
def test_diffusers_models_have_our_keys_and_shapes(name):
  import diffusers
  from didr_jax import model_configs
  from didr_jax.models.diffusers_loading import KINDS
  d = model_configs.load(name)
  kind = KINDS[d["_class_name"]]
  cfg = kind.config_cls.from_dict(d)
  with torch.device("meta"):
    theirs = getattr(diffusers, d["_class_name"]).from_config(d)
  shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  state = _ours(d["_class_name"], cfg)
  assert _count(state) == sum(int(np.prod(s)) for s in shapes.values())
  assert {r.source for r in kind.rules(cfg)} == set(shapes)   # the mapping table covers diffusers' keys

def test_pickscore_config_builds_transformers_clip():
  import transformers
  from didr_jax import model_configs, sharding
  from didr_jax.models.clip import CLIPModel
  from didr_jax.models.clip_loading import hf_clip_config
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs
  d = model_configs.load("pickscore_clip")
  with torch.device("meta"):
    theirs = transformers.CLIPModel(transformers.CLIPConfig(**{k: v for k, v in d.items() if k != "architectures"}))
  cfg = hf_clip_config(d)
  _, state = sharding.abstract_model(lambda: CLIPModel(cfg, rngs=ShapeOnlyRngs()), sharding.single_device_mesh(),
                                     sharding.get_rules("replicated"))
  n_theirs = sum(p.numel() for p in theirs.parameters())
  assert _count(state) == n_theirs
  assert theirs.config.vision_config.hidden_size == 1280 and theirs.config.text_config.hidden_size == 1024
