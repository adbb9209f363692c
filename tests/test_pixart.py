"""PixArt-alpha transformer parity against PyTorch diffusers (fp32, CPU): forward with padded
captions, padding invariance, input gradients (also under remat), export round trip, weight-folder
errors naming the key, config checks, and key coverage of the real PixArt-XL-2-1024-MS."""
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.clip_torch_env import torch  # noqa: I001  (before diffusers: torchvision workaround)
from tests.torch_refs import nchw, nhwc, rel_err, torch_grad, torch_key_shapes
from didr_jax import model_configs
from didr_jax.models.diffusers_loading import ShapeOnlyRngs
from didr_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from didr_jax.models import from_diffusers, to_diffusers
from didr_jax.models.pixart_mapping import pixart_rules
from didr_jax.sharding import abstract_model, get_rules, make_mesh, single_device_mesh
from didr_jax.weights import WeightMismatchError, read_weights_folder, write_safetensors

pytestmark = pytest.mark.parity

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
TINY = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
# Additional conditions forced on (diffusers only derives them from sample_size == 128), a
# non-square 12x8 input (position embedding recomputed for the grid) and interpolation_scale 2.
TINY_COND = {**TINY, "use_additional_conditions": True, "interpolation_scale": 2}
# transformer/config.json of PixArt-alpha/PixArt-XL-2-1024-MS (a legacy Transformer2DModel
# config: no use_additional_conditions, which diffusers derives as True from sample_size 128).
XL_1024 = model_configs.load("pixart_transformer")   # PixArt-XL-2-1024-MS transformer/config.json
TINY_KEYS = set(PixArtConfig.__dataclass_fields__)  # the fields PixArtTransformer2DModel takes


def _inputs(cond: bool, h: int, w: int, seed: int = 0) -> dict:
  """Batch of 2: row 0 has a 6-token caption, row 1 only 3 (its padding is garbage, masked)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  out = dict(x=f(2, h, w, 4), t=np.array([999.0, 17.0], np.float32),
             encoder_hidden_states=f(2, 6, 32),
             encoder_attention_mask=np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.float32))
  out["added_cond"] = (dict(resolution=np.array([[1024, 1024], [768, 1344]], np.float32),
                            aspect_ratio=np.array([[1.0], [0.57]], np.float32)) if cond else None)
  return out


def _randomize(model, seed: int):
  """Seeded values for every parameter (diffusers zero-inits some, e.g. ``proj_out``); unlike
  ``torch_refs._randomize`` this also handles the top-level ``scale_shift_table``."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 16
      p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
  return model.eval()


def _torch_call(tm, inp, x=None):
  added = inp["added_cond"] or {"resolution": None, "aspect_ratio": None}
  return tm(nchw(inp["x"]) if x is None else x,
            encoder_hidden_states=torch.from_numpy(inp["encoder_hidden_states"]),
            timestep=torch.from_numpy(inp["t"]),
            added_cond_kwargs={k: None if v is None else torch.from_numpy(v)
                               for k, v in added.items()},
            encoder_attention_mask=torch.from_numpy(inp["encoder_attention_mask"])).sample


@jax.jit
def forward(model, inp):
  return model(**inp)


@jax.jit
def grad_x(model, inp, w):
  return jax.grad(lambda x: jnp.sum(model(**{**inp, "x": x}) * w))(inp["x"])


def _case(tmp_path_factory, config, name, h, w):
  from diffusers import PixArtTransformer2DModel as TorchPixArt
  torch.manual_seed(0)
  tm = _randomize(TorchPixArt(**config), seed=1)
  folder = tmp_path_factory.mktemp(name)
  tm.save_pretrained(folder)
  inp = _inputs(config.get("use_additional_conditions", False), h, w)
  wts = np.random.default_rng(5).standard_normal((2, h, w, 8)).astype(np.float32)
  with torch.no_grad():
    ref = nhwc(_torch_call(tm, inp))
  ref_grad = torch_grad(lambda x: _torch_call(tm, inp, x), inp["x"], wts)
  model = from_diffusers(str(folder))
  return SimpleNamespace(torch=tm, folder=str(folder), inp=inp, w=wts, ref=ref, ref_grad=ref_grad,
                         model=model, out=np.asarray(forward(model, inp)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  return _case(tmp_path_factory, TINY, "pixart", 8, 8)


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
  return _case(tmp_path_factory, TINY_COND, "pixart_cond", 12, 8)


@pytest.mark.parametrize("name", ["plain", "cond"])
def test_forward_parity_all_eight_channels(name, request):
  c = request.getfixturevalue(name)
  assert c.out.shape == c.ref.shape == c.inp["x"].shape[:3] + (8,)
  err = rel_err(c.out, c.ref)
  print(f"{name} forward rel err {err:.2e}")
  assert err < FWD_TOL


@pytest.mark.parametrize("name", ["plain", "cond"])
def test_caption_padding_does_not_change_the_result(name, request):
  """Row 1 of the padded batch equals row 1 run alone with only its 3 real tokens."""
  c = request.getfixturevalue(name)
  one = {k: (None if v is None else {kk: vv[1:] for kk, vv in v.items()}) if k == "added_cond"
         else v[1:] for k, v in c.inp.items()}
  one["encoder_hidden_states"] = one["encoder_hidden_states"][:, :3]
  one["encoder_attention_mask"] = None
  err = rel_err(np.asarray(forward(c.model, one)), c.out[1:])
  print(f"{name} padding rel err {err:.2e}")
  assert err < FWD_TOL


def test_input_gradient_parity(plain):
  err = rel_err(np.asarray(grad_x(plain.model, plain.inp, plain.w)), plain.ref_grad)
  print(f"plain grad rel err {err:.2e}")
  assert err < GRAD_TOL


def test_input_gradient_parity_with_remat(cond):
  """Additional conditions, non-square input, the scanned block under full remat."""
  model = from_diffusers(cond.folder, remat="full")
  err = rel_err(np.asarray(grad_x(model, cond.inp, cond.w)), cond.ref_grad)
  print(f"cond remat grad rel err {err:.2e}")
  assert err < GRAD_TOL


def test_jax_attention_and_fsdp_sharded_load_agree(plain):
  """The fused-kernel path (boolean caption mask) on a 2x4 data/fsdp mesh: each device reads
  only its slice of the lazily stacked block weights."""
  model = from_diffusers(plain.folder, attention="jax", mesh=make_mesh((2, 4, 1)),
                                rules="fsdp")
  kernel = model.transformer_blocks.attn1.to_q.kernel.get_value()
  assert kernel.sharding.spec[1] == "fsdp" and len(kernel.addressable_shards) == 8
  err = rel_err(np.asarray(forward(model, plain.inp)), plain.ref)
  print(f"jax attention + fsdp rel err {err:.2e}")
  assert err < FWD_TOL


def test_export_round_trip_through_diffusers(cond, tmp_path):
  from diffusers import PixArtTransformer2DModel as TorchPixArt
  to_diffusers(cond.model, str(tmp_path))
  back = TorchPixArt.from_pretrained(str(tmp_path)).eval()
  assert back.config.use_additional_conditions is True
  ref_sd, back_sd = cond.torch.state_dict(), back.state_dict()
  assert sorted(ref_sd) == sorted(back_sd)
  assert all(torch.equal(ref_sd[k], back_sd[k]) for k in ref_sd)
  with torch.no_grad():
    err = rel_err(nhwc(_torch_call(back, cond.inp)), cond.ref)
  assert err == 0.0


def test_released_checkpoints_class_name_loads(plain, tmp_path):
  """PixArt-alpha's released transformer folders name the class ``Transformer2DModel``
  (diffusers' pipeline loads them as ``PixArtTransformer2DModel`` regardless)."""
  import shutil
  folder = tmp_path / "transformer"
  shutil.copytree(plain.folder, folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
  model = from_diffusers(str(folder))
  assert isinstance(model, PixArtTransformer2DModel)
  np.testing.assert_array_equal(np.asarray(forward(model, plain.inp)), plain.out)


@pytest.mark.parametrize("edit,key", [
    ("remove", "transformer_blocks.1.attn2.to_k.weight"),
    ("rename", "transformer_blocks.0.ff.net.2.bias"),
    ("reshape", "transformer_blocks.1.scale_shift_table"),
    ("reshape", "caption_projection.linear_1.weight"),
    ("extra", "transformer_blocks.2.attn1.to_q.weight"),
])
def test_bad_folder_names_the_key(plain, tmp_path, edit, key):
  tensors = {k: np.array(v) for k, v in read_weights_folder(plain.folder,
                                                            "diffusion_pytorch_model").items()}
  if edit == "remove":
    del tensors[key]
  elif edit == "rename":
    tensors[key + "_renamed"] = tensors.pop(key)
  elif edit == "reshape":
    tensors[key] = tensors[key][..., :-1]
  else:  # a layer the config does not have
    tensors[key] = tensors["transformer_blocks.1.attn1.to_q.weight"]
  write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
  (tmp_path / "config.json").write_text(json.dumps(plain.torch.config))
  with pytest.raises(WeightMismatchError, match=key.replace(".", r"\.")):
    from_diffusers(str(tmp_path))


@pytest.mark.parametrize("field,value", [
    ("norm_type", "ada_norm_zero"), ("activation_fn", "geglu"), ("norm_elementwise_affine", True),
    ("dropout", 0.1), ("attention_type", "gated"), ("double_self_attention", True),
    ("cross_attention_dim", 16), ("num_embeds_ada_norm", None)])
def test_unsupported_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    PixArtConfig.from_dict({**TINY, field: value})


def test_config_round_trip_and_derived_fields():
  cfg = PixArtConfig.from_dict(XL_1024)
  assert cfg.additional_conditions and cfg.pos_interpolation_scale == 2 and cfg.base_size == 64
  d = cfg.to_dict()
  assert d["_class_name"] == "PixArtTransformer2DModel"
  assert PixArtConfig.from_dict(d) == cfg
  tiny = PixArtConfig.from_dict(TINY)
  assert not tiny.additional_conditions and tiny.pos_interpolation_scale == 1
  with pytest.raises(ValueError, match="field 'bogus'|bogus"):
    PixArtConfig.from_dict({**TINY, "bogus": 1})


def test_mapping_table_covers_full_size_pixart_xl():
  """Every key and shape of the real PixArt-XL-2-1024-MS state dict (meta device, no weights)."""
  from diffusers import PixArtTransformer2DModel as TorchPixArt
  with torch.device("meta"):
    tm = TorchPixArt.from_config({k: v for k, v in XL_1024.items() if k in TINY_KEYS})
  assert tm.use_additional_conditions
  shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
  cfg = PixArtConfig.from_dict(XL_1024)
  _, abs_state = abstract_model(lambda: PixArtTransformer2DModel(cfg, rngs=ShapeOnlyRngs()),
                                single_device_mesh(), get_rules("replicated"))
  flat = {".".join(map(str, p)): v.get_value() if isinstance(v, nnx.Variable) else v
          for p, v in nnx.to_flat_state(abs_state)}
  rules = pixart_rules(cfg)
  assert sorted(r.target for r in rules) == sorted(flat)
  assert torch_key_shapes(rules, {k: v.shape for k, v in flat.items()}) == shapes
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_state))
  assert ours == sum(int(np.prod(s)) for s in shapes.values()) == sum(
      p.numel() for p in tm.parameters())
  print(f"PixArt-XL-2 parameters: {ours}")

