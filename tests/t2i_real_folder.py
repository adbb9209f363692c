"""A complete on-disk SDXL-layout reference folder from tiny random models (torch only writes the
transformers files), plus a PickScore-layout reward folder: exercises the real-run loaders."""
import os
import shutil

from tests import clip_fixtures as cf  # noqa: I001  (before transformers: torchvision workaround)
import torch
from flax import nnx

from didr_jax import sharding
from didr_jax.models.diffusers_loading import ShapeOnlyRngs, to_diffusers
from didr_jax.models.unet import UNet2DConditionModel
from didr_jax.models.vae import AutoencoderKL
from didr_jax.pipelines import tiny


def _text_tower(folder, hidden, projection, seed):
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  cfg = CLIPTextConfig(vocab_size=cf.REAL_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu",
                       projection_dim=projection or 8, bos_token_id=49406, pad_token_id=49407,
                       eos_token_id=2, max_position_embeddings=77)
  (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval().save_pretrained(folder)


def write_sdxl_folders(root: str):
  """(reference folder, reward folder) holding every file the SDXL real-run config reads."""
  mesh, rules = sharding.single_device_mesh(), sharding.get_rules("replicated")
  ref = os.path.join(root, "sdxl")
  ucfg, vcfg = tiny.unet_config("sdxl"), tiny.vae_config("sdxl")
  for sub, make in (("unet", lambda: UNet2DConditionModel(ucfg, rngs=ShapeOnlyRngs())),
                    ("vae", lambda: AutoencoderKL(vcfg, rngs=ShapeOnlyRngs()))):
    g, p = tiny.create_random(make, mesh, rules, seed=3)
    with sharding.model_context(mesh, rules):
      to_diffusers(nnx.merge(g, p), os.path.join(ref, sub))
  _text_tower(os.path.join(ref, "text_encoder"), 16, None, 0)
  _text_tower(os.path.join(ref, "text_encoder_2"), 32, 32, 1)
  tok = cf.tokenizer_folder(os.path.join(root, "tok"))
  for sub in ("tokenizer", "tokenizer_2"):
    shutil.copytree(tok, os.path.join(ref, sub))
  reward = os.path.join(root, "pick")
  cf.hf_clip_model(reward, act="gelu", vocab=cf.REAL_VOCAB, eos=cf.REAL_EOS, seed=5)
  for name in os.listdir(tok):
    shutil.copy(os.path.join(tok, name), reward)
  return ref, reward
