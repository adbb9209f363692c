"""UNet parity against PyTorch diffusers (fp32, CPU): forward, input gradients, export round trip,
remat + NNX tree mode, and mapping-table coverage of the real SD1.5 / SDXL configs."""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402
from flax import nnx  # noqa: E402

from tests import torch_refs as R  # noqa: I001  (before torch: torchvision workaround)
from didr_jax.models import from_diffusers, to_diffusers
from didr_jax.models.diffusers_loading import abstract_for
from didr_jax.models.unet import UNetConfig
from didr_jax.models.unet_blocks import nearest_resize, timestep_embedding
from didr_jax.models.unet_mapping import unet_rules
from didr_jax.sharding import get_rules, single_device_mesh

pytestmark = pytest.mark.parity

FWD_TOL, GRAD_TOL = 1e-4, 1e-3


@jax.jit
def forward(model, inputs):
  return model(**inputs)


def _grad(model, inputs, w):
  loss = lambda x: jnp.sum(model(**{**inputs, "sample": x}) * w)
  return jax.grad(loss)(inputs["sample"])


grad_sample = jax.jit(_grad)


def _case(tmp_path_factory, config, name, **input_kw):
  """Tiny torch UNet saved with save_pretrained, loaded back with from_diffusers, plus refs."""
  tm = R.build_unet(config, seed=1)
  folder = tmp_path_factory.mktemp(name)
  tm.save_pretrained(folder)
  inputs = R.unet_inputs(config, **input_kw)
  w = np.random.default_rng(5).standard_normal(inputs["sample"].shape).astype(np.float32)
  with torch.no_grad():
    ref = R.nhwc(R.torch_unet_call(tm, inputs))
  ref_grad = R.torch_grad(lambda x: R.torch_unet_call(tm, inputs, sample=x), inputs["sample"], w)
  model = from_diffusers(str(folder))
  return SimpleNamespace(torch=tm, folder=str(folder), inputs=inputs, w=w, ref=ref,
                         ref_grad=ref_grad, model=model, out=np.asarray(forward(model, inputs)))


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
  """SD1.5-like, called with a scalar timestep (broadcast over the batch) on 10x10 latents:
  10 -> 5 -> 3 going down, so the up path must resize 3 -> 5 -> 10 as torch does."""
  return _case(tmp_path_factory, R.SD15_TINY, "sd15", scalar_timestep=True, size=10)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  return _case(tmp_path_factory, R.SDXL_TINY, "sdxl")


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_forward_parity(name, request):
  case = request.getfixturevalue(name)
  err = R.rel_err(case.out, case.ref)
  print(f"{name} UNet forward: max|err| / max|ref| = {err:.2e}")
  assert case.out.shape == case.ref.shape
  assert err <= FWD_TOL


def test_sd15_input_gradient_parity(sd15):
  g = np.asarray(grad_sample(sd15.model, sd15.inputs, sd15.w))
  err = R.rel_err(g, sd15.ref_grad)
  print(f"sd15 UNet d(sum(out*w))/d sample: relative error {err:.2e}")
  assert err <= GRAD_TOL


def test_sdxl_input_gradient_parity_tree_mode_remat(sdxl):
  """SDXL gradients, loaded and differentiated in NNX tree mode with a remat policy."""
  with nnx.set_graph_mode(False), nnx.set_graph_updates(False):
    model = from_diffusers(sdxl.folder, remat="dots_no_batch")
    g = np.asarray(jax.jit(_grad)(model, sdxl.inputs, sdxl.w))
  err = R.rel_err(g, sdxl.ref_grad)
  print(f"sdxl UNet d(sum(out*w))/d sample (tree mode, remat): relative error {err:.2e}")
  assert err <= GRAD_TOL


def test_export_round_trip_through_diffusers(sdxl, tmp_path):
  from diffusers import UNet2DConditionModel
  to_diffusers(sdxl.model, str(tmp_path))
  back = UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  for key, value in sdxl.torch.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  with torch.no_grad():
    out = R.nhwc(R.torch_unet_call(back, sdxl.inputs))
  err = R.rel_err(sdxl.out, out)
  print(f"sdxl export round trip (ours vs diffusers.from_pretrained(exported)): {err:.2e}")
  assert err <= FWD_TOL


def test_attention_implementations_and_bf16_compute_agree():
  """A transformer block with attention="jax" equals "xla"; bf16 compute stays close to fp32."""
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs
  from didr_jax.models.unet_blocks import Transformer2DModel, _Opts
  from didr_jax.sharding import abstract_model, model_context

  mesh, rules = single_device_mesh(), get_rules("replicated")
  make = lambda rngs, **opts: Transformer2DModel(32, heads=4, num_layers=1, cross_attention_dim=24,
                                                 groups=8, opts=_Opts(**opts), rngs=rngs)
  with model_context(mesh, rules):
    state = nnx.state(make(nnx.Rngs(0)))  # one eager init, shared by every variant

  def block(**opts):
    graphdef, _ = abstract_model(lambda: make(ShapeOnlyRngs(), **opts), mesh, rules)
    return functools.partial(jax.jit(lambda m, x, c: m(x, c)), nnx.merge(graphdef, state))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
  ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
  ref = np.asarray(block(attention="xla")(x, ctx))
  np.testing.assert_allclose(np.asarray(block(attention="jax")(x, ctx)), ref, atol=1e-5)
  low = block(dtype=jnp.bfloat16)(jnp.asarray(x, jnp.bfloat16), ctx)
  assert low.dtype == jnp.bfloat16
  assert R.rel_err(np.asarray(low, np.float32), ref) < 3e-2


def test_lcm_time_cond_proj_matches_diffusers():
  """``time_cond_proj_dim`` (LCM-distilled UNets): numerics of the embedding, and table coverage."""
  from diffusers import UNet2DConditionModel
  from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
  from didr_jax.models.unet_blocks import TimestepEmbedding, _Opts
  from didr_jax.models.unet_mapping import RuleBuilder
  from didr_jax.sharding import model_context
  from didr_jax.weights import load_state

  ref = R._randomize(TorchTimestepEmbedding(16, 64, cond_proj_dim=8), 0)
  with model_context(single_device_mesh(), get_rules("replicated")):
    ours = TimestepEmbedding(16, 64, cond_proj_dim=8, opts=_Opts(), rngs=nnx.Rngs(0))
  table = RuleBuilder()
  table.linear("linear_1")
  table.linear("linear_2")
  table.linear("cond_proj", bias=False)
  tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  nnx.update(ours, load_state(nnx.state(ours), tensors, table.rules, what="TimestepEmbedding"))
  rng = np.random.default_rng(0)
  t_emb, cond = rng.standard_normal((3, 16), np.float32), rng.standard_normal((3, 8), np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(t_emb), torch.from_numpy(cond)).numpy()
  np.testing.assert_allclose(np.asarray(ours(t_emb, cond)), want, atol=1e-5, rtol=1e-5)

  config = dict(R.SDXL_TINY, time_cond_proj_dim=8)
  cfg = UNetConfig.from_dict(config)
  _, abs_state = abstract_for("UNet2DConditionModel", cfg, dtype=jnp.float32,
                              param_dtype=jnp.float32, attention="xla", remat="none",
                              mesh=single_device_mesh(), rules=get_rules("replicated"))
  shapes = R.meta_state_shapes(UNet2DConditionModel, config)
  assert "time_embedding.cond_proj.weight" in shapes
  assert R.table_mismatches(unet_rules(cfg), abs_state, shapes) == []


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0.0, 1.0, 399.0, 999.0], np.float32)
  for dim, flip, shift in ((32, True, 0), (33, False, 1)):
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    ours = np.asarray(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift))
    # float32 sin/cos of arguments up to ~1e3 rad: one ulp of the frequency moves them ~6e-5
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_nearest_resize_matches_torch_for_odd_sizes():
  x = np.random.default_rng(0).standard_normal((1, 3, 5, 2)).astype(np.float32)
  for size in ((6, 10), (5, 9), (7, 11)):
    ref = torch.nn.functional.interpolate(R.nchw(x), size=size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(nearest_resize(x, size)), R.nhwc(ref))


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text"),
    ("down_block_types", ("AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    ("attention_head_dim", (4, 4)), ("resnet_time_scale_shift", "scale_shift"),
    ("act_fn", "gelu"), ("time_embedding_type", "fourier"), ("some_new_field", 1)])
def test_unsupported_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    UNetConfig.from_dict({**R.SD15_TINY, field: value})


@pytest.mark.parametrize("name", ["SD15_REAL", "SDXL_REAL"])
def test_mapping_table_covers_full_size_unets(name):
  """Every key and shape of the real SD1.5 / SDXL state dicts (meta device, no weights)."""
  from diffusers import UNet2DConditionModel
  config = getattr(R, name)
  shapes = R.meta_state_shapes(UNet2DConditionModel, config)
  cfg = UNetConfig.from_dict(config)
  _, abs_state = abstract_for("UNet2DConditionModel", cfg, dtype=jnp.float32,
                              param_dtype=jnp.float32, attention="xla", remat="none",
                              mesh=single_device_mesh(), rules=get_rules("replicated"))
  assert len(shapes) == {"SD15_REAL": 686, "SDXL_REAL": 1680}[name]
  assert R.table_mismatches(unet_rules(cfg), abs_state, shapes) == []
