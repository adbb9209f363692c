"""LoRA adapters (``didr_jax/models/lora.py``) on the tiny SDXL UNet: step 0 equals the base, only
the adapters receive gradients, the merged kernel is W + (alpha / r) A B, bad settings are named,
and the PEFT-format export loaded by diffusers' LoRA loader onto the base UNet reproduces our
adapted model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax import sharding
from didr_jax.models import lora
from didr_jax.models.diffusers_loading import ShapeOnlyRngs
from didr_jax.models.unet import UNet2DConditionModel
from didr_jax.models.unet_mapping import unet_rules
from didr_jax.pipelines.tiny import create_random, unet_config
from didr_jax.weights import flat_state
from didr_jax.weights.mapping import leaf_value

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base():
  cfg = unet_config("sdxl")
  graph, params = create_random(lambda: UNet2DConditionModel(cfg, rngs=ShapeOnlyRngs()),
                                sharding.single_device_mesh(), sharding.get_rules("replicated"), 0)
  targets = lora.lora_targets(unet_rules(cfg), lora.default_targets("UNet2DConditionModel"))
  return cfg, graph, params, targets


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
  return (f(2, 4, 4, 4), jnp.array([10.0, 700.0]), f(2, 16, 48),
          dict(text_embeds=f(2, 32), time_ids=jnp.tile(jnp.array([[16.0, 16, 0, 0, 16, 16]]), (2, 1))))


def _forward(graph, params, inputs):
  x, t, ctx, extra = inputs
  return nnx.merge(graph, params)(x, t, ctx, **extra)


def _nonzero(adapters, seed=1):
  """Adapters with B drawn too (B = 0 at init would hide every mistake after step 0)."""
  key = jax.random.PRNGKey(seed)
  return {p: {"a": a["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), a["b"].shape)}
          for i, (p, a) in enumerate(sorted(adapters.items()))}


def test_targets_are_the_attention_and_feed_forward_linears(base):
  _, _, _, targets = base
  modules = set(targets.values())
  assert modules and all(m.split(".")[-1] in ("to_q", "to_k", "to_v", "0", "proj", "2") for m in modules)
  assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in modules
  assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj" in modules
  assert not any("conv" in m or "time_embedding" in m for m in modules)
  only_q = lora.lora_targets(unet_rules(unet_config("sdxl")), ["attn1.to_q"])
  assert set(only_q.values()) == {m for m in modules if m.endswith("attn1.to_q")}


def test_step_zero_equals_the_base_and_merge_is_w_plus_scaled_ab(base):
  _, graph, params, targets = base
  adapters = lora.init_adapters(params, targets, RANK, jax.random.PRNGKey(0))
  inputs = _inputs()
  run = jax.jit(lambda p: _forward(graph, p, inputs))
  np.testing.assert_array_equal(np.asarray(run(lora.merge(params, adapters, ALPHA / RANK))),
                                np.asarray(run(params)))
  moved = _nonzero(adapters)
  merged = flat_state(lora.merge(params, moved, ALPHA / RANK))
  flat = flat_state(params)
  path = next(iter(targets))
  a, b = np.asarray(moved[path]["a"], np.float64), np.asarray(moved[path]["b"], np.float64)
  want = np.asarray(leaf_value(flat[path]), np.float64) + ALPHA / RANK * a @ b
  np.testing.assert_allclose(np.asarray(leaf_value(merged[path])), want, rtol=1e-6, atol=1e-6)
  other = next(k for k in flat if k not in targets)
  np.testing.assert_array_equal(np.asarray(leaf_value(merged[other])),
                                np.asarray(leaf_value(flat[other])))


def test_only_the_adapters_receive_gradients(base):
  _, graph, params, targets = base
  adapters = _nonzero(lora.init_adapters(params, targets, RANK, jax.random.PRNGKey(0)))
  inputs = _inputs()

  def loss(p, ad):
    return jnp.sum(_forward(graph, lora.merge(p, ad, ALPHA / RANK), inputs) ** 2)
  g_base, g_ad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, adapters)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_base))
  assert all(float(jnp.abs(g["a"]).max()) > 0 and float(jnp.abs(g["b"]).max()) > 0
             for g in g_ad.values())


@pytest.mark.parametrize("call, field", [
    (lambda rules: lora.lora_targets(rules, ["to_q", "attn9.nowhere"]), r"model\.lora\.targets: \['attn9\.nowhere'\]"),
    (lambda rules: lora.lora_targets(rules, ["norm1"]), r"model\.lora\.targets: \['norm1'\] match no linear or convolution"),
    (lambda rules: lora.lora_targets(rules, []), r"model\.lora\.targets: empty"),
    (lambda rules: lora.check_rank(-1, 8.0), r"model\.lora\.rank: -1"),
    (lambda rules: lora.check_rank(4, 0.0), r"model\.lora\.alpha: 0\.0"),
    (lambda rules: lora.default_targets("AutoencoderKL"), r"no adapters for 'AutoencoderKL'"),
])
def test_bad_settings_name_the_field(call, field):
  with pytest.raises(lora.LoraError, match=field):
    call(unet_rules(unet_config("sdxl")))


CONVS = ("conv1", "conv2", "conv_shortcut", "conv_in")


def test_convolution_adapter_merges_as_kh_kw_then_1x1(base):
  """A convolution kernel [kh, kw, in, out] takes A [kh, kw, in, r], B [r, out]: the merged kernel
  is W + s sum_r A[..., r] B[r] (float64 reference), and step 0 still equals the base."""
  cfg, graph, params, _ = base
  targets = lora.lora_targets(unet_rules(cfg), CONVS)
  assert all(leaf_value(flat_state(params)[p]).ndim == 4 for p in targets)
  assert {m.split(".")[-1] for m in targets.values()} == set(CONVS)
  adapters = lora.init_adapters(params, targets, RANK, jax.random.PRNGKey(0))
  run = jax.jit(lambda p: _forward(graph, p, _inputs()))
  np.testing.assert_array_equal(np.asarray(run(lora.merge(params, adapters, ALPHA / RANK))),
                                np.asarray(run(params)))
  moved = _nonzero(adapters)
  merged = flat_state(lora.merge(params, moved, ALPHA / RANK))
  for path in list(targets)[:3]:
    a, b = np.asarray(moved[path]["a"], np.float64), np.asarray(moved[path]["b"], np.float64)
    want = np.asarray(leaf_value(flat_state(params)[path]), np.float64) + ALPHA / RANK * np.einsum(
        "hwir,ro->hwio", a, b)
    np.testing.assert_allclose(np.asarray(leaf_value(merged[path])), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("extra", [(), CONVS], ids=["linears", "linears+convs"])
def test_diffusers_lora_loader_reproduces_our_adapted_unet(base, tmp_path, extra):
  """The exported ``pytorch_lora_weights.safetensors`` loaded with diffusers'
  ``load_lora_adapter`` onto the base UNet (written by our exporter) gives our merged output,
  with the default (linear) targets and with convolutions added."""
  from tests.clip_torch_env import torch
  from tests import torch_refs as R
  from diffusers import UNet2DConditionModel as TorchUNet
  from didr_jax.models import to_diffusers
  from didr_jax.weights import read_safetensors
  cfg, graph, params, targets = base
  targets = lora.lora_targets(unet_rules(cfg), lora.default_targets("UNet2DConditionModel") + extra)
  to_diffusers(nnx.merge(graph, params), str(tmp_path / "unet"))
  adapters = _nonzero(lora.init_adapters(params, targets, RANK, jax.random.PRNGKey(0)))
  prefix = lora.peft_prefix("UNet2DConditionModel")
  path = lora.save_peft(str(tmp_path / "unet_lora"), adapters, targets, ALPHA / RANK, prefix)
  ours = np.asarray(jax.jit(lambda p: _forward(graph, p, _inputs()))(
      lora.merge(params, adapters, ALPHA / RANK)))
  tm = TorchUNet.from_pretrained(str(tmp_path / "unet")).eval()
  tm.load_lora_adapter({k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(path).items()},
                       prefix=prefix)
  x, t, ctx, extra = _inputs()
  inputs = dict(sample=np.asarray(x), timestep=np.asarray(t), encoder_hidden_states=np.asarray(ctx),
                **{k: np.asarray(v) for k, v in extra.items()})
  with torch.no_grad():
    ref = R.nhwc(R.torch_unet_call(tm, inputs))
  assert R.rel_err(ours, ref) <= 1e-4, R.rel_err(ours, ref)
  base_out = np.asarray(jax.jit(lambda p: _forward(graph, p, _inputs()))(params))
  assert R.rel_err(base_out, ref) > 1e-2, "the adapter must change the output"
