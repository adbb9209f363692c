"""Random tiny SDXL- / SD1.5-shaped models built in memory, so the pipeline runs on a CPU in CI.

SDXL-shaped: text_time UNet with linear projections and two text towers (context 16 + 32 = 48,
pooled 32, add embedding 32 + 6 x 8 = 80); SD1.5-shaped: conv-projection UNet, one tower
(context 32). A 4x-downsampling VAE (4x4 latents <-> 16x16 images) and a PickScore-style CLIP
reward (exp(logit_scale) cos(image, text)) complete the set. All towers share HashTokenizer ids.
"""
from __future__ import annotations

from flax import nnx

from didr_jax import sharding
import jax
import numpy as np

from didr_jax.models.diffusers_loading import ShapeOnlyRngs
from didr_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, \
    CLIPTextModelWithProjection, CLIPVisionConfig
from didr_jax.models.unet import UNet2DConditionModel, UNetConfig
from didr_jax.models.vae import AutoencoderKL, VAEConfig
from didr_jax.pipelines.conditioning import HashTokenizer
from didr_jax.rewards.clip_rewards import clip_reward

VOCAB, TOKENS = 1000, 16


def unet_config(backbone: str, width: int = 16) -> UNetConfig:
  """``width``: channels of the first level (the second has 2x); benchmarks scale it up."""
  if backbone == "sdxl":
    return UNetConfig(
        sample_size=4, block_out_channels=(width, 2 * width), layers_per_block=1,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), cross_attention_dim=48, norm_num_groups=8,
        use_linear_projection=True, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
  return UNetConfig(
      sample_size=4, block_out_channels=(width, 2 * width), layers_per_block=1, attention_head_dim=4,
      cross_attention_dim=32, norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def vae_config(backbone: str, width: int = 8) -> VAEConfig:
  return VAEConfig(block_out_channels=(width, 2 * width, 2 * width),
                   down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                   latent_channels=4, sample_size=16,
                   scaling_factor=0.13025 if backbone == "sdxl" else 0.18215)


def text_configs(backbone: str):
  small = CLIPTextConfig(vocab_size=VOCAB, width=16, layers=2, heads=2, mlp_dim=32,
                         max_positions=TOKENS, eos_token_id=VOCAB - 1)
  big = CLIPTextConfig(vocab_size=VOCAB, width=32, layers=2, heads=4, mlp_dim=64, act="gelu",
                       max_positions=TOKENS, projection_dim=32, eos_token_id=VOCAB - 1)
  if backbone == "sdxl":
    return [(CLIPTextModel, small), (CLIPTextModelWithProjection, big)]
  return [(CLIPTextModel, CLIPTextConfig(**{**big.__dict__, "projection_dim": None, "act": "quick_gelu"}))]


def reward_config() -> CLIPConfig:
  return CLIPConfig(
      text=CLIPTextConfig(vocab_size=VOCAB, width=32, layers=2, heads=4, mlp_dim=37, act="gelu",
                          max_positions=TOKENS, projection_dim=16, eos_token_id=VOCAB - 1),
      vision=CLIPVisionConfig(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=37,
                              act="gelu", projection_dim=16))


def _init_leaf(name: str, shape, rng):
  """Host init by parameter name: biases 0, norm scales 1, embeddings N(0, 0.02^2), weights
  N(0, 1/fan_in) (fan_in = product of all but the last axis: dense (in, out), conv HWIO)."""
  if name == "logit_scale":
    return np.full(shape, 2.6592, np.float32)
  if "bias" in name:
    return np.zeros(shape, np.float32)
  if "scale" in name:
    return np.ones(shape, np.float32)
  if "embedding" in name or len(shape) < 2:
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = int(np.prod(shape[:-1]))
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def create_random(make_model, mesh, rules, seed: int):
  """(graphdef, state) of a randomly initialised model, every parameter placed with its fitted
  target sharding (dimensions the mesh does not divide kept whole, e.g. the 4 output channels of
  ``conv_out`` on an 8-way fsdp axis). Parameters are drawn on the host: tracing the modules'
  own initialisers costs minutes of CPU time even for these tiny models."""
  graphdef, abs_state = sharding.abstract_model(make_model, mesh, rules)
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]
    value = _init_leaf(name, leaf.shape, rng).astype(leaf.dtype)
    return jax.device_put(value, leaf.sharding)
  return graphdef, jax.tree_util.tree_map_with_path(init, abs_state)


def build(backbone: str, *, seed: int, mesh, rules, dtype, param_dtype, vae_dtype, text_mesh,
          width: int = 16, vae_width: int = 8):
  """dict(unet_graph, ref, vae_graph, vae, vae_config, towers, reward) of random tiny models."""
  ucfg = unet_config(backbone, width)
  unet_graph, ref = create_random(
      lambda: UNet2DConditionModel(ucfg, dtype=dtype, param_dtype=param_dtype, rngs=ShapeOnlyRngs()),
      mesh, rules, seed)
  vcfg = vae_config(backbone, vae_width)
  vae_graph, vae = create_random(
      lambda: AutoencoderKL(vcfg, dtype=vae_dtype, param_dtype=param_dtype, rngs=ShapeOnlyRngs()),
      mesh, rules, seed + 1)
  tok = HashTokenizer(VOCAB, TOKENS)
  repl = sharding.get_rules("replicated")
  towers = []
  for i, (cls, tcfg) in enumerate(text_configs(backbone)):
    g, p = create_random(lambda: cls(tcfg, rngs=ShapeOnlyRngs()), text_mesh, repl, seed + 2 + i)
    towers.append((tok, g, p))
  rg, rp = create_random(lambda: CLIPModel(reward_config(), rngs=ShapeOnlyRngs()), mesh, rules, seed + 9)
  with sharding.model_context(mesh, rules):
    clip = nnx.merge(rg, rp)
  reward = clip_reward("tiny_pickscore", clip, tokenizer=tok)
  return dict(unet_graph=unet_graph, ref=ref, vae_graph=vae_graph, vae=vae, vae_config=vcfg,
              towers=towers, reward=reward)
