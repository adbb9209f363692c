"""``attention="splash"`` (the Pallas splash kernel; Pallas interpret mode on CPU) against a float64
NumPy softmax attention: self- and cross-attention with sequences that are not whole blocks and
per-example key masks, its gradients against the ``xla`` path's, per-shard runs under a mesh, the
tiny SDXL UNet and the tiny DiTs (masked captions) against ``xla``, and the TPU compile of an
SDXL-size attention layer (deviceless, libtpu): the kernel lowers for TPU and does not hold the
[B, H, Tq, Tk] logits the ``xla`` path holds."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.models.attention import dot_product_attention


def numpy_attention(q, k, v, keep=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if keep is not None:
    logits = np.where(np.asarray(keep)[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(b=2, tq=200, tk=200, h=3, d=64, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (b, tq, h, d)), jax.random.normal(ks[1], (b, tk, h, d)),
          jax.random.normal(ks[2], (b, tk, h, d)))


@jax.jit
def _splash(q, k, v, mask):
  return dot_product_attention(q, k, v, implementation="splash", mask=mask)


@pytest.mark.parametrize("tq, tk, lengths", [(200, 200, None), (200, 77, (77, 30)), (128, 256, (256, 1))])
def test_splash_equals_softmax_attention(tq, tk, lengths):
  """Self-attention over 200 tokens (padded to 256), cross-attention to 77 caption tokens of which
  example 1 keeps 30, and whole blocks with one kept key."""
  q, k, v = _qkv(tq=tq, tk=tk)
  keep = None if lengths is None else np.arange(tk)[None, :] < np.asarray(lengths)[:, None]
  mask = None if keep is None else jnp.asarray(keep)[:, None, None, :]
  got = _splash(q, k, v, mask)
  chex.assert_shape(got, q.shape[:3] + (v.shape[-1],))
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, keep), rtol=2e-5, atol=2e-5)


def test_splash_gradients_equal_xla():
  q, k, v = _qkv(tq=130, tk=77)
  keep = jnp.asarray(np.arange(77)[None, :] < np.array([[77], [40]]))[:, None, None, :]
  w = jax.random.normal(jax.random.PRNGKey(3), (2, 130, 3, 64))

  def loss(impl):
    return lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, implementation=impl, mask=keep) * w)
  got = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5, err_msg=name)
  assert float(jnp.abs(got[1][1, 40:]).max()) == 0.0, "masked keys get no gradient"


@pytest.mark.parametrize("batch", [4, 3])
def test_splash_under_a_mesh_runs_per_shard(batch):
  """8 devices as data 2 x fsdp 2 x tensor 2 (shard_map): batch 4 splits over data and fsdp,
  batch 3 over neither (each device holds all of it); the 4 heads split over tensor."""
  from didr_jax.models.attention import _batch_axes
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = _qkv(b=batch, tq=64, tk=77, h=4, d=32, seed=1)
  spec = P(("data", "fsdp")) if batch % 4 == 0 else P()
  with jax.set_mesh(mesh):
    args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (q, k, v)]
    got = _splash(*args, None)
    axes = _batch_axes(batch, 4)[1:]
  np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v), rtol=2e-5, atol=2e-5)
  assert axes == ((("data", "fsdp") if batch == 4 else ()), "tensor"), axes


def test_tiny_sdxl_unet_with_splash_equals_xla():
  from flax import nnx
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs
  from didr_jax.models.unet import UNet2DConditionModel
  from didr_jax.pipelines.tiny import unet_config
  cfg = unet_config("sdxl")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
  t = jnp.array([10.0, 700.0])
  ctx = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 48))
  extra = dict(text_embeds=jax.random.normal(jax.random.PRNGKey(2), (2, 32)),
               time_ids=jnp.tile(jnp.array([[16.0, 16, 0, 0, 16, 16]]), (2, 1)))
  pair = _random_pair(lambda impl: UNet2DConditionModel(cfg, attention=impl, rngs=ShapeOnlyRngs()))
  out = {impl: np.asarray(jax.jit(lambda p, g=graph: nnx.merge(g, p)(x, t, ctx, **extra))(params))
         for impl, (graph, params) in pair.items()}
  np.testing.assert_allclose(out["splash"], out["xla"], rtol=1e-4, atol=1e-5)


def _random_pair(make):
  """(graph, params) of ``make(attention)`` for xla and splash, the same random parameters."""
  from didr_jax import sharding
  from didr_jax.pipelines.tiny import create_random
  return {impl: create_random(lambda: make(impl), sharding.single_device_mesh(),
                              sharding.get_rules("replicated"), 0) for impl in ("xla", "splash")}


@pytest.mark.parametrize("dit", ["pixart", "zimage"])
def test_tiny_dits_with_splash_equal_xla(dit):
  """The DiTs' masked attention through splash: PixArt's cross-attention to captions of 6 and 3
  real tokens, Z-Image's joint attention over image and caption tokens with per-item masks."""
  from flax import nnx
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  if dit == "pixart":
    from didr_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
    cfg = PixArtConfig.from_dict(dict(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))
    make = lambda impl: PixArtTransformer2DModel(cfg, attention=impl, rngs=ShapeOnlyRngs())
    args = (f(2, 8, 8, 4), jnp.array([999.0, 17.0]), f(2, 6, 32),
            jnp.array([[1.0] * 6, [1, 1, 1, 0, 0, 0]]))
  else:
    from didr_jax.models.zimage import ZImageConfig, ZImageTransformer2DModel
    cfg = ZImageConfig.from_dict(dict(
        all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=64, n_layers=2,
        n_refiner_layers=1, n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[160, 16, 16], rope_theta=256.0, t_scale=1000.0,
        norm_eps=1e-5))
    make = lambda impl: ZImageTransformer2DModel(cfg, attention=impl, rngs=ShapeOnlyRngs())
    args = (f(2, 10, 12, 4), jnp.array([0.3, 0.85]), f(2, 40, 32),
            jnp.asarray(np.arange(40)[None] < np.array([[40], [7]])))
  out = {impl: np.asarray(jax.jit(lambda p, g=graph: nnx.merge(g, p)(*args))(params))
         for impl, (graph, params) in _random_pair(make).items()}
  np.testing.assert_allclose(out["splash"], out["xla"], rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
  q, k, v = _qkv(tq=8, tk=8)
  with pytest.raises(ValueError, match="causal attention is not supported"):
    dot_product_attention(q, k, v, implementation="splash", causal=True)
  with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 8, 8\) given; only key masks"):
    dot_product_attention(q, k, v, implementation="splash", mask=jnp.ones((2, 1, 8, 8), bool))
  from flax import nnx
  from didr_jax.models.qwen3 import Qwen3Config, Qwen3TextEncoder
  with pytest.raises(ValueError, match="'splash' has no causal path"):
    cfg = Qwen3Config(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    Qwen3TextEncoder(cfg, rngs=nnx.Rngs(0), attention="splash")


def test_sdxl_size_layer_compiles_for_tpu_without_the_logits():
  """SDXL's first attention level at 1024 px (4,096 tokens, 10 heads of 64, batch 2 per chip as
  under CFG) forward + backward, batch-sharded over a v5e 2x2 slice: the ``xla`` path's
  temporaries hold the float32 logits (2 x 10 x 4096^2 x 4 B = 1.25 GiB per chip, and more for
  their softmax and gradient); splash's hold less than one such copy."""
  from didr_jax.pipelines.plan import topology_devices
  _, devices = topology_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
  sh = NamedSharding(mesh, P("fsdp"))
  arg = jax.ShapeDtypeStruct((8, 4096, 10, 64), jnp.bfloat16, sharding=sh)
  logits = 2 * 10 * 4096 ** 2 * 4
  temp = {}
  for impl in ("xla", "splash"):
    def loss(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32))
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(sh, sh, sh))
    with jax.set_mesh(mesh):
      compiled = step.lower(arg, arg, arg).compile()
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
    if impl == "splash":
      assert "tpu_custom_call" in compiled.as_text(), "the Mosaic kernel is in the TPU program"
  assert temp["xla"] >= logits, temp
  assert temp["splash"] < logits / 4, temp
