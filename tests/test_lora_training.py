"""LoRA in the trainer (``didr_jax/pipelines/lora_training.py``): adapters are placed over the FSDP
mesh like the kernels they adapt (a 1/8 share per device on 8 devices), and each role's network
params come from the right frozen base (the reference for the TA and a generator initialised from
it, ``gen_base`` for a generator of its own), untouched for a role without adapters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.sdxl import get_config
from didr_jax import sharding
from didr_jax.models import lora
from didr_jax.models.diffusers_loading import ShapeOnlyRngs
from didr_jax.models.unet import UNet2DConditionModel
from didr_jax.models.unet_mapping import unet_rules
from didr_jax.pipelines import lora_training
from didr_jax.pipelines.tiny import create_random, unet_config
from didr_jax.weights import flat_state
from didr_jax.weights.mapping import leaf_value


@pytest.fixture(scope="module")
def unet():
  cfg = unet_config("sdxl", width=32)
  mesh = sharding.make_mesh((1, 8, 1), devices=jax.devices()[:8])
  graph, params = create_random(lambda: UNet2DConditionModel(cfg, rngs=ShapeOnlyRngs()), mesh,
                                sharding.get_rules("fsdp"), 0)
  return cfg, mesh, params


def _run(cfg, networks=("generator", "ta"), extra_targets=()):
  c = get_config("tiny")
  c.model.lora.rank, c.model.lora.alpha, c.model.lora.networks = 4, 8.0, networks
  c.model.lora.targets = tuple(c.model.lora.targets) + extra_targets
  return lora_training.from_config(c, unet_rules(cfg))


def _largest_share(tree) -> int:
  per = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
  return max(per.values())


@pytest.mark.parametrize("extra", [(), ("conv1", "conv2")], ids=["linears", "linears+convs"])
def test_adapters_are_sharded_over_fsdp_like_their_kernels(unet, extra):
  cfg, mesh, params = unet
  run = _run(cfg, extra_targets=extra)
  adapters = run.init(params, jax.random.PRNGKey(0))
  total = sum(x.nbytes for x in jax.tree.leaves(adapters))
  assert _largest_share(adapters) <= total / 8 * 1.05, (_largest_share(adapters), total)
  abstract = run.abstract(params)
  for path, pair in adapters.items():
    for k in ("a", "b"):
      assert pair[k].sharding == abstract[path][k].sharding and pair[k].shape == abstract[path][k].shape
      spec = tuple(pair[k].sharding.spec)
      assert spec[-1 if k == "a" else -2] is None, (path, k, spec)   # the rank axis stays whole
  np.testing.assert_array_equal(np.asarray(next(iter(adapters.values()))["b"]), 0.0)


def test_each_role_runs_on_its_own_base(unet):
  cfg, _, params = unet
  run = _run(cfg, networks=("generator",))
  key = jax.random.PRNGKey(1)
  adapters = {p: {"a": a["a"], "b": 0.1 * jax.random.normal(jax.random.fold_in(key, i), a["b"].shape)}
              for i, (p, a) in enumerate(sorted(run.init(params, key).items()))}
  other = jax.tree.map(lambda x: x + 1.0, params)
  fn = lora_training.network_params(run)
  path = next(iter(run.targets))
  kernel = lambda tree: np.asarray(leaf_value(flat_state(tree)[path]), np.float64)
  ab = np.asarray(adapters[path]["a"], np.float64) @ np.asarray(adapters[path]["b"], np.float64)
  on_ref = fn("gen", adapters, {"ref": params})
  np.testing.assert_allclose(kernel(on_ref), kernel(params) + 2.0 * ab, rtol=1e-5, atol=1e-6)
  on_own = fn("gen", adapters, {"ref": params, "gen_base": other})
  np.testing.assert_allclose(kernel(on_own), kernel(other) + 2.0 * ab, rtol=1e-5, atol=1e-6)
  assert fn("ta", other, {"ref": params}) is other        # the TA trains in full here
  assert lora_training.network_params(None) is None       # rank 0: the Task's identity


def test_rank_zero_is_off_and_networks_are_named(unet):
  cfg, _, _ = unet
  c = get_config("tiny")
  assert lora_training.from_config(c, unet_rules(cfg)) is None
  with pytest.raises(lora.LoraError, match=r"model\.lora\.networks: \['generator', 'generator'\]"):
    _run(cfg, networks=("generator", "generator"))
  assert jnp.isclose(_run(cfg).scale, 2.0)
