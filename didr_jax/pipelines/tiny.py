"""Random tiny models of each backbone built in memory, so the pipeline runs on a CPU in CI.

SDXL-shaped: text_time UNet with linear projections and two text towers (context 16 + 32 = 48,
pooled 32, add embedding 32 + 6 x 8 = 80); SD1.5-shaped: conv-projection UNet, one tower
(context 32); PixArt-shaped: a 2-layer DiT (3 heads of 8, 8 output channels, additional
conditions on) reading a 2-layer T5 encoder (width 32); Z-Image-shaped: a 2+2+2-layer single-stream
DiT (width 64) reading a 3-layer Qwen3 (width 32, GQA). A 4x-downsampling VAE (4x4 latents <-> 16x16
images; 16 latent channels and a shift factor for Z-Image) and a PickScore-style CLIP reward
(exp(logit_scale) cos(image, text)) complete the set. All towers share HashTokenizer ids.
"""
from __future__ import annotations

from flax import nnx

from didr_jax import sharding
import jax
import numpy as np

from didr_jax.models.diffusers_loading import KINDS, ShapeOnlyRngs
from didr_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, \
    CLIPTextModelWithProjection, CLIPVisionConfig
from didr_jax.models.pixart import PixArtConfig
from didr_jax.models.qwen3 import Qwen3Config, Qwen3TextEncoder
from didr_jax.models.t5 import T5EncoderConfig, T5EncoderModel
from didr_jax.models.unet import UNetConfig
from didr_jax.models.vae import AutoencoderKL, VAEConfig
from didr_jax.models.zimage import ZImageConfig
from didr_jax.pipelines.backbones import get as get_backbone
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


def network_config(backbone: str, width: int = 16):
  """The denoiser's config; ``width`` scales the channels (UNets), the hidden size (PixArt: 3 heads
  of width / 2; Z-Image: 4 heads of width) at a fixed depth. 16: the ``:tiny`` networks."""
  if backbone in ("sdxl", "sd15"):
    return unet_config(backbone, width)
  if backbone == "pixart":
    head = width // 2
    return PixArtConfig.from_dict(dict(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=head, num_attention_heads=3,
        caption_channels=T5_TINY.d_model, in_channels=4, out_channels=8, cross_attention_dim=3 * head,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=True))
  if backbone == "zimage":
    return ZImageConfig.from_dict(dict(
        all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=4 * width, n_layers=2,
        n_refiner_layers=2, n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=QWEN3_TINY.hidden_size,
        axes_dims=[width // 4, 3 * width // 8, 3 * width // 8], axes_lens=[64, 16, 16], rope_theta=256.0,
        t_scale=1000.0, norm_eps=1e-5))
  raise ValueError(f"backbone {backbone!r} has no tiny network")


def vae_config(backbone: str, width: int = 8) -> VAEConfig:
  flux = backbone == "zimage"   # the 16-channel Flux-style VAE: no quant convs, a shift factor
  return VAEConfig(block_out_channels=(width, 2 * width, 2 * width),
                   down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                   latent_channels=get_backbone(backbone).latent_channels, sample_size=16,
                   scaling_factor={"sdxl": 0.13025, "zimage": 0.3611}.get(backbone, 0.18215),
                   shift_factor=0.1159 if flux else None, use_quant_conv=not flux,
                   use_post_quant_conv=not flux)


T5_TINY = T5EncoderConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16)
QWEN3_TINY = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=64)


def text_configs(backbone: str):
  if backbone == "pixart":
    return [(T5EncoderModel, T5_TINY)]
  if backbone == "zimage":
    return [(Qwen3TextEncoder, QWEN3_TINY)]
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


def tokenizer(backbone: str) -> HashTokenizer:
  """The tiny towers' tokenizer (with a mask for the T5 and Qwen3 towers, as theirs)."""
  return HashTokenizer(VOCAB, TOKENS, with_mask=backbone in ("pixart", "zimage"))


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


def network(backbone: str, *, seed: int, mesh, rules, dtype, param_dtype, width: int = 16):
  """(graph, params) of the tiny reference network of ``seed`` (the same numbers on any mesh)."""
  cls = KINDS[get_backbone(backbone).network_class].model_cls
  ncfg = network_config(backbone, width)
  return create_random(lambda: cls(ncfg, dtype=dtype, param_dtype=param_dtype, rngs=ShapeOnlyRngs()),
                       mesh, rules, seed)


def build(backbone: str, *, seed: int, mesh, rules, dtype, param_dtype, vae_dtype, text_mesh,
          width: int = 16, vae_width: int = 8):
  """dict(net_graph, ref, vae_graph, vae, vae_config, towers, reward) of random tiny models."""
  net_graph, ref = network(backbone, seed=seed, mesh=mesh, rules=rules, dtype=dtype,
                           param_dtype=param_dtype, width=width)
  vcfg = vae_config(backbone, vae_width)
  vae_graph, vae = create_random(
      lambda: AutoencoderKL(vcfg, dtype=vae_dtype, param_dtype=param_dtype, rngs=ShapeOnlyRngs()),
      mesh, rules, seed + 1)
  tok = tokenizer(backbone)
  repl = sharding.get_rules("replicated")
  towers = []
  for i, (cls, tcfg) in enumerate(text_configs(backbone)):
    g, p = create_random(lambda: cls(tcfg, rngs=ShapeOnlyRngs()), text_mesh, repl, seed + 2 + i)
    towers.append((tok, g, p))
  rg, rp = create_random(lambda: CLIPModel(reward_config(), rngs=ShapeOnlyRngs()), mesh, rules, seed + 9)
  with sharding.model_context(mesh, rules):
    clip = nnx.merge(rg, rp)
  reward = clip_reward("tiny_pickscore", clip, tokenizer=HashTokenizer(VOCAB, TOKENS))
  return dict(net_graph=net_graph, ref=ref, vae_graph=vae_graph, vae=vae, vae_config=vcfg,
              towers=towers, reward=reward)
