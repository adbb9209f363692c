"""LoRA adapters (``didr_jax/models/lora.py``) on the DiTs' stacked (scanned) blocks, on the tiny
PixArt-alpha and Z-Image networks: the default targets are every layer of the blocks' attention
and feed-forward linears, step 0 equals the base, each layer's merged kernel is
W_l + (alpha / r) A_l B_l, only the adapters receive gradients, the PEFT export has one key pair
per layer, patterns naming one layer or nothing are refused, and the export loaded onto our
exported base transformer by diffusers' ``load_lora_adapter`` (Z-Image) or by PEFT itself
(PixArt: diffusers 0.42's ``PixArtTransformer2DModel`` has no LoRA loader) reproduces our
adapted model."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax import sharding
from didr_jax.models import lora
from didr_jax.models.diffusers_loading import KINDS, ShapeOnlyRngs
from didr_jax.models.zimage_mapping import STACKS
from didr_jax.pipelines.backbones import get as get_backbone
from didr_jax.pipelines.tiny import create_random, network_config
from didr_jax.weights import flat_state
from didr_jax.weights.mapping import leaf_value

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_MODULES = {
    "pixart": {f"transformer_blocks.*.{a}.{n}" for a in ("attn1", "attn2") for n in ATTENTION}
              | {"transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2"},
    "zimage": {f"{s}.*.{m}" for s in STACKS for m in [f"attention.{n}" for n in ATTENTION]
               + [f"feed_forward.w{i}" for i in (1, 2, 3)]},
}


def _inputs(name: str) -> dict:
  """Keyword inputs of our model: a batch of 2 whose second caption is padded."""
  rng = np.random.default_rng(0)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  if name == "pixart":
    return dict(x=f(2, 4, 4, 4), t=np.array([999.0, 17.0], np.float32),
                encoder_hidden_states=f(2, 6, 32),
                encoder_attention_mask=np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.float32),
                added_cond=dict(resolution=np.array([[32, 32], [24, 40]], np.float32),
                                aspect_ratio=np.array([[1.0], [0.6]], np.float32)))
  return dict(x=f(2, 4, 4, 16), t=np.array([0.3, 0.85], np.float32), cap_feats=f(2, 8, 32),
              cap_mask=np.arange(8)[None] < np.array([[8], [5]]))


@pytest.fixture(scope="module", params=sorted(DEFAULT_MODULES))
def dit(request):
  name = request.param
  class_name = get_backbone(name).network_class
  cfg, kind = network_config(name), KINDS[class_name]
  graph, params = create_random(lambda: kind.model_cls(cfg, rngs=ShapeOnlyRngs()),
                                sharding.single_device_mesh(), sharding.get_rules("replicated"), 0)
  targets = lora.lora_targets(kind.rules(cfg), lora.default_targets(class_name))
  run = jax.jit(lambda p: nnx.merge(graph, p)(**_inputs(name)))
  return SimpleNamespace(name=name, class_name=class_name, graph=graph, params=params,
                         targets=targets, run=run)


def _nonzero(adapters, seed=1):
  """Adapters with B drawn too (B = 0 at init would hide every mistake after step 0)."""
  key = jax.random.PRNGKey(seed)
  return {p: {"a": a["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), a["b"].shape)}
          for i, (p, a) in enumerate(sorted(adapters.items()))}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_default_targets_are_every_layer_of_the_blocks_linears(dit):
  assert set(dit.targets.values()) == DEFAULT_MODULES[dit.name]
  flat = flat_state(dit.params)
  assert all(leaf_value(flat[p]).ndim == 3 for p in dit.targets)


def test_step_zero_equals_the_base_and_each_layer_merges_w_plus_scaled_ab(dit):
  adapters = lora.init_adapters(dit.params, dit.targets, RANK, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(dit.run(lora.merge(dit.params, adapters, SCALE))),
                                np.asarray(dit.run(dit.params)))
  path = next(iter(dit.targets))
  a = np.asarray(adapters[path]["a"], np.float64)
  assert a.shape[0] >= 2 and not np.allclose(a[0], a[1]), "layers draw independent A"
  moved = _nonzero(adapters)
  merged, flat = flat_state(lora.merge(dit.params, moved, SCALE)), flat_state(dit.params)
  b = np.asarray(moved[path]["b"], np.float64)
  w = np.asarray(leaf_value(flat[path]), np.float64)
  for layer in range(w.shape[0]):
    np.testing.assert_allclose(np.asarray(leaf_value(merged[path]))[layer],
                               w[layer] + SCALE * a[layer] @ b[layer], rtol=1e-6, atol=1e-6)
  other = next(k for k in flat if k not in dit.targets)
  np.testing.assert_array_equal(np.asarray(leaf_value(merged[other])),
                                np.asarray(leaf_value(flat[other])))


def test_only_the_adapters_receive_gradients(dit):
  adapters = _nonzero(lora.init_adapters(dit.params, dit.targets, RANK, jax.random.PRNGKey(0)))
  loss = lambda p, ad: jnp.sum(dit.run(lora.merge(p, ad, SCALE)) ** 2)
  g_base, g_ad = jax.jit(jax.grad(loss, argnums=(0, 1)))(dit.params, adapters)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_base))
  for path, g in g_ad.items():   # every layer of every stacked adapter learns
    for part in ("a", "b"):
      per_layer = jnp.abs(g[part]).max(axis=(1, 2))
      assert float(per_layer.min()) > 0, (path, part, per_layer)


def test_peft_state_has_one_scaled_pair_per_layer(dit):
  adapters = _nonzero(lora.init_adapters(dit.params, dit.targets, RANK, jax.random.PRNGKey(0)))
  state = lora.peft_state(adapters, dit.targets, SCALE, lora.peft_prefix(dit.class_name))
  layers = {p: a["a"].shape[0] for p, a in adapters.items()}
  assert len(state) == 2 * sum(layers.values())
  path = next(iter(dit.targets))
  last = layers[path] - 1
  module = "transformer." + dit.targets[path].replace("*", str(last))
  np.testing.assert_array_equal(state[f"{module}.lora_A.weight"],
                                np.asarray(adapters[path]["a"][last]).T)
  np.testing.assert_allclose(state[f"{module}.lora_B.weight"],
                             SCALE * np.asarray(adapters[path]["b"][last]).T, rtol=1e-6)


@pytest.mark.parametrize("name, patterns, message", [
    ("pixart", ["to_q", "transformer_blocks.1.attn1.to_q"],
     r"model\.lora\.targets: \['transformer_blocks\.1\.attn1\.to_q'\] name single layers"),
    ("zimage", ["layers.0.attention.to_q"],
     r"model\.lora\.targets: \['layers\.0\.attention\.to_q'\] name single layers"),
    ("zimage", ["to_q", "ff.net.2"], r"model\.lora\.targets: \['ff\.net\.2'\] match no linear"),
    ("pixart", ["feed_forward.w1"], r"model\.lora\.targets: \['feed_forward\.w1'\] match no linear"),
    ("pixart", ["scale_shift_table"], r"model\.lora\.targets: \['scale_shift_table'\] match no linear"),
])
def test_patterns_naming_one_layer_or_nothing_are_refused(name, patterns, message):
  cfg = network_config(name)
  rules = KINDS[get_backbone(name).network_class].rules(cfg)
  with pytest.raises(lora.LoraError, match=message):
    lora.lora_targets(rules, patterns)


def _load_lora(tm, state: dict, prefix: str) -> None:
  """diffusers' ``load_lora_adapter`` where the class has it (Z-Image). diffusers 0.42's
  ``PixArtTransformer2DModel`` has no LoRA loader (no ``PeftAdapterMixin``): there PEFT itself
  injects and fills the adapters, as ``load_lora_adapter`` does inside."""
  if hasattr(tm, "load_lora_adapter"):
    tm.load_lora_adapter(state, prefix=prefix)
    return
  from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
  state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
  modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
  inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=modules), tm)
  result = set_peft_model_state_dict(tm, state)
  assert not result.unexpected_keys, result.unexpected_keys
  assert not [k for k in result.missing_keys if "lora_" in k]


def _torch_forward(tm, name: str, inp: dict) -> np.ndarray:
  """diffusers' transformer on our inputs (Z-Image: unpadded caption lists); NHWC output."""
  from tests.clip_torch_env import torch
  t = torch.from_numpy
  if name == "pixart":
    out = tm(t(inp["x"].transpose(0, 3, 1, 2).copy()), timestep=t(inp["t"]),
             encoder_hidden_states=t(inp["encoder_hidden_states"]),
             encoder_attention_mask=t(inp["encoder_attention_mask"]),
             added_cond_kwargs={k: t(v) for k, v in inp["added_cond"].items()}).sample
    return out.permute(0, 2, 3, 1).numpy()
  xs = [t(x.transpose(2, 0, 1).copy())[:, None] for x in inp["x"]]
  caps = [t(c[m]) for c, m in zip(inp["cap_feats"], inp["cap_mask"])]
  out = tm(xs, t(inp["t"]), caps, return_dict=False)[0]
  return torch.stack([o[:, 0] for o in out]).permute(0, 2, 3, 1).numpy()


@pytest.mark.parity
def test_diffusers_loads_our_export_onto_our_exported_base(dit, tmp_path):
  """Our ``pytorch_lora_weights.safetensors`` on the base transformer we export reproduces our
  merged output (and the adapters change it, so the check can fail)."""
  from tests.clip_torch_env import torch
  import diffusers
  from didr_jax.models import to_diffusers
  from didr_jax.weights import read_safetensors
  folder = str(tmp_path / "transformer")
  to_diffusers(nnx.merge(dit.graph, dit.params), folder)
  adapters = _nonzero(lora.init_adapters(dit.params, dit.targets, RANK, jax.random.PRNGKey(0)))
  path = lora.save_peft(str(tmp_path / "lora"), adapters, dit.targets, SCALE,
                        lora.peft_prefix(dit.class_name))
  tm = getattr(diffusers, dit.class_name).from_pretrained(folder).eval()
  assert hasattr(tm, "load_lora_adapter") == (dit.name == "zimage"), \
      "diffusers' LoRA loader support changed: update _load_lora and docs/models.md"
  _load_lora(tm, {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(path).items()},
             lora.peft_prefix(dit.class_name))
  with torch.no_grad():
    ref = _torch_forward(tm, dit.name, _inputs(dit.name))
  ours = np.asarray(dit.run(lora.merge(dit.params, adapters, SCALE)))
  assert _rel(ours, ref) <= 1e-4, _rel(ours, ref)
  assert _rel(np.asarray(dit.run(dit.params)), ref) > 1e-2, "the adapters must change the output"
