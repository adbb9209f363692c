"""The DiTs' scanned layers keep their activations batch-sharded under FSDP. Checked in the program
XLA's TPU compiler makes for 4 chips (libtpu, no TPU): without the layers' batch constraint the
propagation kept the scan's carry whole and sharded the contractions like the FSDP kernels, so
each chip held the global batch's feed-forward activations (the full-size Z-Image TA step for 64
chips: [64, 4608, 10240] on every chip, 40 GiB of temporaries for one image per chip)."""
import re

import jax
import jax.numpy as jnp
import pytest

from didr_jax import sharding
from didr_jax.models.diffusers_loading import abstract_for
from didr_jax.pipelines import backbones, tiny
from didr_jax.pipelines.plan import topology_devices

B, CHIPS = 16, 4


def _ffn_leading_dims(backbone: str) -> tuple[set, int]:
  """Leading dims of every [lead, tokens, hidden] array of the compiled per-chip gradient program,
  and the feed-forward hidden width."""
  _, devices = topology_devices("v5e:2x2")
  mesh = sharding.make_mesh((1, CHIPS, 1), devices=devices)
  bb = backbones.get(backbone)
  cfg = tiny.network_config(backbone, 64)
  graph, params = abstract_for(bb.network_class, cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                               attention="xla", remat="full", mesh=mesh, rules=sharding.get_rules("fsdp"))
  apply = backbones.network_apply(bb, graph, bb.schedule)
  rows = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct((B,) + s, dtype,
                                                            sharding=sharding.batch_sharding(mesh, len(s) + 1))
  cond = {"context": rows(tiny.TOKENS, 32), "mask": rows(tiny.TOKENS, dtype=jnp.bool_)}
  if backbone == "pixart":
    cond.update(resolution=rows(2), aspect_ratio=rows(1))
  loss = lambda p, x, t, c: jnp.mean(apply(p, x, t, c).astype(jnp.float32) ** 2)
  with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss)).lower(params, rows(16, 16, bb.latent_channels), rows(), cond).compile().as_text()
  ffn = (params["layers"]["feed_forward"]["w1"] if backbone == "zimage"
         else params["transformer_blocks"]["ff_proj"])["kernel"]
  hidden = ffn.shape[-1]
  return {int(m) for m in re.findall(rf"\[(\d+),\d+,{hidden}\]", text)}, hidden


@pytest.mark.parametrize("backbone", ["zimage", "pixart"])
def test_scanned_layers_hold_a_chips_share_of_the_batch(backbone):
  leading, hidden = _ffn_leading_dims(backbone)
  assert leading, f"no [batch, tokens, {hidden}] feed-forward activation found in the program"
  assert max(leading) <= B // CHIPS, (backbone, sorted(leading))
