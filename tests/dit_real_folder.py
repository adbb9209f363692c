"""On-disk PixArt- and Z-Image-layout reference folders of tiny random models (torch only writes the
transformers text encoder), with real tokenizer files and scheduler configs, plus a
PickScore-layout reward: exercises the DiT backbones' real-run loaders and validation."""
import json
import os
import shutil

from tests import clip_fixtures as cf  # noqa: I001  (before transformers: torchvision workaround)
import torch
from flax import nnx

from didr_jax import sharding
from didr_jax.models.diffusers_loading import KINDS, ShapeOnlyRngs, to_diffusers
from didr_jax.models.vae import AutoencoderKL
from didr_jax.models.zimage import ZImageConfig
from didr_jax.pipelines import backbones, tiny
from tests.text_fixtures import write_qwen3_tokenizer, write_t5_tokenizer

SCHEDULERS = {
    "pixart": {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear",
               "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
               "prediction_type": "epsilon"},
    "zimage": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
               "num_train_timesteps": 1000, "use_dynamic_shifting": False},
}


def network_config(backbone: str):
  """The tiny network; Z-Image's rope tables long enough for the real tokenizer's 512 tokens."""
  cfg = tiny.network_config(backbone)
  if backbone == "zimage":
    cfg = ZImageConfig.from_dict({**cfg.to_dict(), "axes_lens": [544, 16, 16]})
  return cfg


def _text_encoder(folder: str, backbone: str):
  from transformers import Qwen3Config, Qwen3Model, T5Config, T5EncoderModel
  torch.manual_seed(0)
  if backbone == "pixart":
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                    num_layers=2, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=16,
                                    feed_forward_proj="gated-gelu", dropout_rate=0.0))
  else:
    model = Qwen3Model(Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=1024))
  model.eval().save_pretrained(folder, safe_serialization=True)


def write_dit_folders(root: str, backbone: str):
  """(reference folder, reward folder) holding every file the backbone's real-run config reads."""
  mesh, rules = sharding.single_device_mesh(), sharding.get_rules("replicated")
  ref = os.path.join(root, backbone)
  ncfg, vcfg = network_config(backbone), tiny.vae_config(backbone)
  cls = KINDS[backbones.get(backbone).network_class].model_cls
  for sub, make in (("transformer", lambda: cls(ncfg, rngs=ShapeOnlyRngs())),
                    ("vae", lambda: AutoencoderKL(vcfg, rngs=ShapeOnlyRngs()))):
    g, p = tiny.create_random(make, mesh, rules, seed=3)
    with sharding.model_context(mesh, rules):
      to_diffusers(nnx.merge(g, p), os.path.join(ref, sub))
  _text_encoder(os.path.join(ref, "text_encoder"), backbone)
  tok = os.path.join(ref, "tokenizer")
  write_t5_tokenizer(tok) if backbone == "pixart" else write_qwen3_tokenizer(tok)
  os.makedirs(os.path.join(ref, "scheduler"))
  with open(os.path.join(ref, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(SCHEDULERS[backbone], f)
  reward = os.path.join(root, "pick")
  cf.hf_clip_model(reward, act="gelu", vocab=cf.REAL_VOCAB, eos=cf.REAL_EOS, seed=5)
  clip_tok = cf.tokenizer_folder(os.path.join(root, "clip_tok"))
  for name in os.listdir(clip_tok):
    shutil.copy(os.path.join(clip_tok, name), reward)
  return ref, reward
