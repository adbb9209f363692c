"""Parity of ``didr_jax.models.zimage`` with diffusers' ``ZImageTransformer2DModel``.

Tiny random float32 configs: forward and input-gradient parity on a batch whose captions have
different lengths and whose latent needs token padding, padding invariance, export round trip,
named errors for bad folders; and key/size coverage of the full-size (6B) table, abstractly.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.clip_torch_env import torch
from tests.torch_refs import torch_key_shapes
from diffusers import ZImageTransformer2DModel as TorchZImage

from didr_jax import model_configs, sharding as shd
from didr_jax.models.diffusers_loading import ShapeOnlyRngs
from didr_jax.models import from_diffusers, to_diffusers
from didr_jax.models.zimage import ZImageConfig, ZImageTransformer2DModel
from didr_jax.models.zimage_mapping import STACKS, zimage_rules
from didr_jax.weights import WeightMismatchError, read_safetensors, write_safetensors

pytestmark = pytest.mark.parity

# Refiners on, QK norm, axes [4, 6, 6]; refiners off, no QK norm, other axes, n_kv_heads 2.
TINY = {
    "refiners": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=64, n_layers=2,
                     n_refiner_layers=2, n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=32,
                     axes_dims=[4, 6, 6], axes_lens=[160, 16, 16], rope_theta=256.0,
                     t_scale=1000.0, norm_eps=1e-5),
    "plain": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=3, dim=64, n_layers=2,
                  n_refiner_layers=0, n_heads=4, n_kv_heads=2, qk_norm=False, cap_feat_dim=32,
                  axes_dims=[8, 4, 4], axes_lens=[100, 12, 12], rope_theta=100.0,
                  t_scale=500.0, norm_eps=1e-6),
}
# The shipped full-size config (diffusers' __init__ defaults; test_full_size_* checks them against the class).
FULL = {k: v for k, v in model_configs.load("zimage_transformer").items() if not k.startswith("_")}
B, H, W, L, LENS = 2, 10, 12, 40, (40, 7)   # 5x6=30 image tokens -> 32; captions -> 64 and 32
RTOL = 1e-5


def _randomize(model, seed):
  """Non-trivial values everywhere (diffusers zero-inits the pad tokens and adaLN layers)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
      if "norm" in module:
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 2 and "pad_token" not in name:
        p.copy_(noise / np.sqrt(p.shape[1]))
      else:
        p.copy_(noise * (1.0 if "pad_token" in name else 0.1))
  return model.eval()


def _inputs(cfg: dict, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, W, cfg["in_channels"])).astype(np.float32)
  t = np.array([0.3, 0.85], np.float32)
  cap = rng.standard_normal((B, L, cfg["cap_feat_dim"])).astype(np.float32)
  mask = np.arange(L)[None] < np.array(LENS)[:, None]
  return x, t, cap, mask


def _torch_forward(tm, x, t, cap, mask):
  """diffusers with the unpadded lists, as the pipeline calls it; back to NHWC."""
  xs = [torch.from_numpy(xi.transpose(2, 0, 1).copy())[:, None] for xi in x]
  caps = [torch.from_numpy(c[m]) for c, m in zip(cap, mask)]
  out = tm(xs, torch.from_numpy(t), caps, return_dict=False)[0]
  return torch.stack([o[:, 0] for o in out]).permute(0, 2, 3, 1)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


_apply = jax.jit(lambda m, x, t, c, k: m(x, t, c, k))


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
  """(config dict, torch model, its saved folder, our model loaded from it)."""
  cfg = TINY[request.param]
  tm = _randomize(TorchZImage(**cfg), seed=len(request.param))
  folder = str(tmp_path_factory.mktemp(request.param))
  tm.save_pretrained(folder)
  return cfg, tm, folder, from_diffusers(folder)


def test_forward_parity_masked_batch(pair):
  cfg, tm, _, model = pair
  x, t, cap, mask = _inputs(cfg)
  with torch.no_grad():
    ref = _torch_forward(tm, x, t, cap, mask).numpy()
  out = _apply(model, x, t, cap, mask)
  assert out.shape == x.shape
  assert _rel(out, ref) < RTOL, _rel(out, ref)


def test_padding_invariance(pair):
  """Extra buffer, left padding and batch neighbours do not change an item's output."""
  cfg, _, _, model = pair
  x, t, cap, mask = _inputs(cfg)
  base = np.asarray(_apply(model, x, t, cap, mask))
  extra = 30   # pushes the buffer to the next multiple of 32; real tokens moved to the end
  cap2 = np.random.default_rng(1).standard_normal((B, L + extra, cap.shape[2])).astype(np.float32)
  mask2 = np.zeros((B, L + extra), bool)
  for i, n in enumerate(LENS):
    cap2[i, L + extra - n:] = cap[i, :n]
    mask2[i, L + extra - n:] = True
  moved = np.asarray(_apply(model, x, t, cap2, mask2))
  alone = np.asarray(_apply(model, x[1:], t[1:], cap[1:, :LENS[1]], mask[1:, :LENS[1]]))
  assert _rel(moved, base) < RTOL, _rel(moved, base)
  assert _rel(alone, base[1:]) < RTOL, _rel(alone, base[1:])


def test_euler_step_in_the_pipeline_convention(pair):
  """One step of the shifted flow schedule with ``flow_velocity`` read out as a flow prediction
  (our DDIM step) equals the Z-Image pipeline's step: the transformer fed (1000 - t) / 1000, its
  output negated, FlowMatchEulerDiscreteScheduler(shift=3).step."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from didr_jax.diffusion import Schedule, ddim_step, to_denoiser
  from didr_jax.models.zimage import flow_velocity
  cfg, tm, _, model = pair
  x, _, cap, mask = _inputs(cfg)
  u = np.array([0.8, 0.45], np.float32)           # unshifted times of two steps
  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  sched.set_timesteps(sigmas=list(u))
  t = sched.timesteps[0]
  with torch.no_grad():
    pred = -_torch_forward(tm, x, np.full((B,), (1000 - float(t)) / 1000, np.float32), cap, mask)
    want = sched.step(pred.permute(0, 3, 1, 2), t, torch.from_numpy(x).permute(0, 3, 1, 2))
  want = want.prev_sample.permute(0, 2, 3, 1).numpy()
  ours = Schedule("rectified_flow", shift=3.0)
  a, s = ours.alpha_sigma(jnp.full((B,), u[0]))
  v = jax.jit(flow_velocity)(model, x, s, cap, mask)
  d, eps = to_denoiser(v, x, a, s, "flow")
  got = ddim_step(d, eps, *ours.alpha_sigma(jnp.full((B,), u[1])))
  assert _rel(got, want) < RTOL, _rel(got, want)


def test_input_gradient_parity(pair):
  cfg, tm, _, model = pair
  x, t, cap, mask = _inputs(cfg)
  w = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  g = jax.jit(jax.grad(lambda x_: jnp.sum(model(x_, t, cap, mask) * w)))(jnp.asarray(x))
  xt = torch.from_numpy(x).requires_grad_(True)
  xs = [xi.permute(2, 0, 1)[:, None] for xi in xt]
  caps = [torch.from_numpy(c[m]) for c, m in zip(cap, mask)]
  out = torch.stack([o[:, 0] for o in tm(xs, torch.from_numpy(t), caps, return_dict=False)[0]])
  (out.permute(0, 2, 3, 1) * torch.from_numpy(w)).sum().backward()
  assert _rel(g, xt.grad.numpy()) < RTOL, _rel(g, xt.grad.numpy())


def test_export_round_trip(pair, tmp_path):
  cfg, _, _, model = pair
  to_diffusers(model, str(tmp_path))
  back = TorchZImage.from_pretrained(str(tmp_path)).eval()
  assert ZImageConfig.from_dict(dict(back.config)) == model.config
  x, t, cap, mask = _inputs(cfg, seed=3)
  with torch.no_grad():
    ref = _torch_forward(back, x, t, cap, mask).numpy()
  assert _rel(_apply(model, x, t, cap, mask), ref) < RTOL


@pytest.mark.parametrize("edit", ["remove", "rename", "reshape"])
def test_bad_folder_names_key(pair, tmp_path, edit):
  cfg, _, folder, _ = pair
  tensors = read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  key = "layers.1.feed_forward.w3.weight"
  value = np.asarray(tensors.pop(key))
  if edit == "rename":
    tensors["layers.1.feed_forward.w4.weight"] = value
  elif edit == "reshape":
    tensors[key] = value[:-1]
  write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(WeightMismatchError, match=key.replace(".", r"\.")) as err:
    from_diffusers(str(tmp_path))
  if edit == "rename":
    assert "layers.1.feed_forward.w4.weight" in str(err.value)


def test_config_errors_name_the_field():
  for bad, field in [(dict(siglip_feat_dim=1152), "siglip_feat_dim"),
                     (dict(all_patch_size=[2, 4], all_f_patch_size=[1, 1]), "all_patch_size"),
                     (dict(axes_dims=[32, 48, 40]), "axes_dims"), (dict(foo=1), "foo")]:
    with pytest.raises(ValueError, match=field):
      ZImageConfig.from_dict({**FULL, **bad})
  assert ZImageConfig.from_dict(ZImageConfig().to_dict()) == ZImageConfig()


def test_full_size_key_coverage():
  """The real 6B table covers exactly diffusers' keys with the same sizes (nothing allocated)."""
  with torch.device("meta"):
    tm = TorchZImage()
  assert {k: v for k, v in tm.config.items() if not k.startswith("_")} == {
      **FULL, "all_patch_size": (2,), "all_f_patch_size": (1,)}
  cfg = ZImageConfig.from_dict(FULL)
  assert cfg.to_dict() == {"_class_name": "ZImageTransformer2DModel", **FULL}
  make = lambda: ZImageTransformer2DModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                          attention="xla", remat="full", rngs=ShapeOnlyRngs())
  _, abs_state = shd.abstract_model(make, shd.single_device_mesh(), shd.get_rules("fsdp"))
  flat = {".".join(map(str, p)): v.get_value() if isinstance(v, nnx.Variable) else v
          for p, v in nnx.to_flat_state(abs_state)}
  rules = zimage_rules(cfg)
  assert sorted(r.target for r in rules) == sorted(flat)
  ours = torch_key_shapes(rules, {k: v.shape for k, v in flat.items()})
  theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
  n_ours = sum(int(np.prod(v.shape)) for v in flat.values())
  assert n_ours == sum(p.numel() for p in tm.parameters())
  assert flat["layers.attention.to_q.kernel"].shape == (30, 3840, 3840)
  assert set(STACKS) <= {k.split(".")[0] for k in flat}
