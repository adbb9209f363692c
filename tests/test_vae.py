"""AutoencoderKL parity against PyTorch diffusers (fp32, CPU): encode, decode, input gradients,
legacy attention key names, export round trip, and table coverage of the real VAE configs; each
for an SD-format VAE (4 latent channels, quant convs) and a FLUX-format one (Z-Image's: 16 latent
channels, no quant convs, a shift factor)."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402

from tests import torch_refs as R  # noqa: I001  (before diffusers: torchvision workaround)
from didr_jax.models import from_diffusers, to_diffusers
from didr_jax.models.diffusers_loading import abstract_for
from didr_jax.models.vae import VAEConfig
from didr_jax.models.vae_mapping import vae_rules
from didr_jax.sharding import get_rules, single_device_mesh
from didr_jax.weights import flat_state, read_safetensors, write_safetensors

pytestmark = pytest.mark.parity

FWD_TOL, GRAD_TOL = 1e-4, 1e-3

SD_VAE_REAL = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True)
FLUX_VAE_REAL = dict(SD_VAE_REAL, latent_channels=16, use_quant_conv=False,
                     use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)


@jax.jit
def run_all(model, x, z, w_dec, w_enc):
  """Encode, decode and both input gradients in one compiled program."""
  dec_loss = lambda z_: jnp.sum(model.decode(z_) * w_dec)
  enc_loss = lambda x_: jnp.sum(model.encode(x_) * w_enc)
  return model.encode(x), model.decode(z), jax.grad(dec_loss)(z), jax.grad(enc_loss)(x)


TINY = {"sd": R.VAE_TINY,
        "flux": dict(R.VAE_TINY, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                     scaling_factor=0.3611, shift_factor=0.1159)}


@pytest.fixture(scope="module", params=sorted(TINY))
def vae(request, tmp_path_factory):
  tm = R.build_vae(TINY[request.param], seed=2)
  lat = tm.config.latent_channels
  folder = tmp_path_factory.mktemp("vae")
  tm.save_pretrained(folder)
  rng = np.random.default_rng(3)
  x = (0.5 * rng.standard_normal((2, 16, 16, 3))).astype(np.float32)
  z = rng.standard_normal((2, 8, 8, lat)).astype(np.float32)
  w_dec = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  w_enc = rng.standard_normal((2, 8, 8, lat)).astype(np.float32)
  with torch.no_grad():
    ref_mean = R.nhwc(tm.encode(R.nchw(x)).latent_dist.mean)
    ref_dec = R.nhwc(tm.decode(R.nchw(z)).sample)
  ref_gz = R.torch_grad(lambda t: tm.decode(t).sample, z, w_dec)
  ref_gx = R.torch_grad(lambda t: tm.encode(t).latent_dist.mean, x, w_enc)
  model = from_diffusers(str(folder))
  outs = [np.asarray(o) for o in run_all(model, x, z, w_dec, w_enc)]
  return SimpleNamespace(torch=tm, folder=str(folder), model=model, x=x, z=z, w_dec=w_dec,
                         w_enc=w_enc, refs=(ref_mean, ref_dec, ref_gz, ref_gx), outs=outs)


def test_encode_decode_parity(vae):
  for name, ours, ref in zip(("encode (latent mean)", "decode"), vae.outs[:2], vae.refs[:2]):
    err = R.rel_err(ours, ref)
    print(f"VAE {name}: max|err| / max|ref| = {err:.2e}")
    assert ours.shape == ref.shape and err <= FWD_TOL


def test_input_gradient_parity(vae):
  for name, ours, ref in zip(("d decode / d z", "d encode / d x"), vae.outs[2:], vae.refs[2:]):
    err = R.rel_err(ours, ref)
    print(f"VAE {name}: relative error {err:.2e}")
    assert err <= GRAD_TOL


def test_latent_scaling_and_shift():
  cfg = VAEConfig.from_dict(dict(R.VAE_TINY, shift_factor=0.25, scaling_factor=0.5))
  model = SimpleNamespace(config=cfg)
  from didr_jax.models.vae import AutoencoderKL
  z = jnp.arange(4.0)
  scaled = AutoencoderKL.scale_latents(model, z)
  np.testing.assert_allclose(scaled, 0.5 * (z - 0.25))
  np.testing.assert_allclose(AutoencoderKL.unscale_latents(model, scaled), z, rtol=1e-6)


def test_legacy_attention_key_names_load(vae, tmp_path):
  """query/key/value/proj_attn (1x1-conv shaped) load like to_q/to_k/to_v/to_out.0."""
  tensors = dict(read_safetensors(f"{vae.folder}/diffusion_pytorch_model.safetensors"))
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in tensors.items():
    for new, old in legacy.items():
      if f"mid_block.attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[:, :, None, None] if value.ndim == 2 else value
    renamed[key] = np.asarray(value)
  assert any(".proj_attn." in k for k in renamed)
  write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), renamed)
  (tmp_path / "config.json").write_text(open(f"{vae.folder}/config.json").read())
  legacy_model = from_diffusers(str(tmp_path))
  from flax import nnx
  want = flat_state(nnx.state(vae.model, nnx.Param))
  got = flat_state(nnx.state(legacy_model, nnx.Param))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k].get_value()), np.asarray(want[k].get_value()))


def test_export_round_trip_through_diffusers(vae, tmp_path):
  from diffusers import AutoencoderKL
  to_diffusers(vae.model, str(tmp_path))
  back = AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  for key, value in vae.torch.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  assert back.config.scaling_factor == vae.torch.config.scaling_factor
  assert back.config.shift_factor == vae.torch.config.shift_factor
  assert back.config.latent_channels == vae.torch.config.latent_channels
  with torch.no_grad():
    dec = R.nhwc(back.decode(R.nchw(vae.z)).sample)
  assert R.rel_err(vae.outs[1], dec) <= FWD_TOL


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")), ("act_fn", "gelu"),
    ("norm_num_groups", 5), ("some_new_field", True)])
def test_unsupported_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    VAEConfig.from_dict({**R.VAE_TINY, field: value})


@pytest.mark.parametrize("config,count", [(SD_VAE_REAL, 248), (FLUX_VAE_REAL, 244)])
def test_mapping_table_covers_full_size_vaes(config, count):
  from diffusers import AutoencoderKL
  shapes = R.meta_state_shapes(AutoencoderKL, config)
  cfg = VAEConfig.from_dict(config)
  _, abs_state = abstract_for("AutoencoderKL", cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                              attention="xla", remat="none", mesh=single_device_mesh(),
                              rules=get_rules("replicated"))
  assert len(shapes) == count
  assert R.table_mismatches(vae_rules(cfg), abs_state, shapes) == []
