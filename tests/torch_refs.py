"""Tiny PyTorch diffusers reference models for the parity tests (test-only; imports torch).

Configs are tiny versions of the real SD1.5 / SDXL configs (docs/models.md, "Parity with PyTorch");
channel counts are multiples of 8 so that the sharded-loading test can split most parameters over 8
devices.
"""
from __future__ import annotations

import numpy as np

# Must precede diffusers: PyPI's CUDA torchvision wheel cannot load next to the CPU torch wheel.
from tests import clip_torch_env  # noqa: F401
import torch

SD15_REAL = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768)

SDXL_REAL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), upcast_attention=None)

# SD1.5-like: conv proj_in/out, int head count, cross-attention in the first two levels
# (one resnet per level keeps XLA's CPU compile short; SDXL_TINY has two).
SD15_TINY = dict(
    sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))

# SDXL-like (the diffusers SDXL pipeline test UNet): text_time, linear projections, tuple head
# counts and transformer_layers_per_block (1, 2). 80 = 32 pooled + 6 * 8 time-id features.
SDXL_TINY = dict(
    sample_size=16, block_out_channels=(16, 32), layers_per_block=2, attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))

VAE_TINY = dict(
    block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=32, scaling_factor=0.13025)


def _randomize(model: torch.nn.Module, seed: int):
  """Non-trivial values everywhere (diffusers zero-inits some outputs, e.g. proj_out)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      module = name.rsplit(".", 2)[-2]
      if "norm" in module:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
      else:
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 16
        p.copy_(noise / np.sqrt(fan_in))
  return model.eval()


def build_unet(config: dict, seed: int = 0):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  return _randomize(UNet2DConditionModel(**config), seed)


def build_vae(config: dict, seed: int = 0):
  from diffusers import AutoencoderKL
  torch.manual_seed(seed)
  return _randomize(AutoencoderKL(**config), seed)


def unet_inputs(config: dict, batch: int = 2, size: int = 16, seed: int = 0,
                scalar_timestep: bool = False) -> dict:
  """NHWC numpy inputs for a UNet config, roughly zero-mean (docs/models.md, "Numerics that parity
  depends on")."""
  rng = np.random.default_rng(seed)
  cross = config["cross_attention_dim"]
  inputs = dict(
      sample=rng.standard_normal((batch, size, size, config.get("in_channels", 4)), np.float32),
      timestep=(np.array(399.0, np.float32) if scalar_timestep
                else np.array([399.0, 17.0, 999.0, 0.0][:batch], np.float32)),
      encoder_hidden_states=rng.standard_normal((batch, 7, cross), np.float32))
  if config.get("addition_embed_type") == "text_time":
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs["text_embeds"] = rng.standard_normal((batch, pooled), np.float32)
    inputs["time_ids"] = np.tile(np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]],
                                          np.float32), (batch, 1))
  return inputs


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_unet_call(model, inputs: dict, sample: torch.Tensor | None = None) -> torch.Tensor:
  """diffusers forward on NHWC numpy ``inputs``; returns the NCHW torch output."""
  added = None
  if "text_embeds" in inputs:
    added = {"text_embeds": torch.from_numpy(inputs["text_embeds"]),
             "time_ids": torch.from_numpy(inputs["time_ids"])}
  sample = nchw(inputs["sample"]) if sample is None else sample
  return model(sample, torch.from_numpy(inputs["timestep"]),
               torch.from_numpy(inputs["encoder_hidden_states"]),
               added_cond_kwargs=added).sample


def torch_grad(fn, x_nhwc: np.ndarray, weights_nhwc: np.ndarray) -> np.ndarray:
  """d sum(fn(x) * w) / dx by torch autograd, NHWC in and out."""
  x = nchw(x_nhwc).requires_grad_(True)
  out = fn(x)
  (out * nchw(weights_nhwc)).sum().backward()
  return nhwc(x.grad)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def table_mismatches(rules, abstract_state, torch_shapes: dict) -> list[str]:
  """Every way a mapping table fails to cover a torch state dict / our abstract state exactly.

  Shapes only: each source shape goes through the rule's transform on a zero-stride array.
  """
  from didr_jax.weights import TRANSFORMS, flat_state
  ours = {k: tuple(v.get_value().shape if hasattr(v, "get_value") else v.shape)
          for k, v in flat_state(abstract_state).items()}
  sources = [r.source for r in rules]
  targets = [r.target for r in rules]
  bad = [f"unused torch key {k}" for k in sorted(set(torch_shapes) - set(sources))]
  bad += [f"table key absent from torch {k}" for k in sorted(set(sources) - set(torch_shapes))]
  bad += [f"param without rule {k}" for k in sorted(set(ours) - set(targets))]
  bad += [f"rule for unknown param {k}" for k in sorted(set(targets) - set(ours))]
  bad += [f"duplicate source {k}" for k in sorted({s for s in sources if sources.count(s) > 1})]
  for r in rules:
    if r.source in torch_shapes and r.target in ours:
      zeros = np.broadcast_to(np.float32(0), torch_shapes[r.source])
      got = TRANSFORMS[r.transform].to_flax(zeros).shape
      if tuple(got) != ours[r.target]:
        bad.append(f"{r.source} {torch_shapes[r.source]} -> {got} != {ours[r.target]}")
  return bad


def meta_state_shapes(cls, config: dict) -> dict:
  """Key -> shape of a full-size diffusers model built on the meta device (no memory)."""
  with torch.device("meta"):
    model = cls.from_config(config)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def torch_key_shapes(rules, flat_shapes: dict) -> dict:
  """{torch key: torch shape} a mapping table expects, from our parameters' shapes
  ({target: shape}); a stacked source ``<stack>.*.<suffix>`` gives one key per layer."""
  from didr_jax.weights import TRANSFORMS
  out = {}
  for rule in rules:
    shape = TRANSFORMS[rule.transform].to_torch(np.empty(flat_shapes[rule.target], np.int8)).shape
    if ".*." not in rule.source:
      out[rule.source] = tuple(shape)
    else:
      stack, _, suffix = rule.source.partition(".*.")
      out.update({f"{stack}.{i}.{suffix}": tuple(shape[1:]) for i in range(shape[0])})
  return out
