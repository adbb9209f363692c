"""LoRA in the t2i trainer (``model.lora``): which networks train adapters, the adapters' initial
values and shardings, and the params each network runs with.

With ``model.lora.rank > 0`` the TrainState's ``gen_params`` / ``ta_params`` of an adapted network
are its adapters (``{kernel path: {"a", "b"}}``); the base weights are frozen and held once in
``frozen``: the reference's ``frozen["ref"]`` is the base of the TA (TA = reference + adapter) and of
a generator initialised from the reference; a generator loaded from its own checkpoint keeps its
base in ``frozen["gen_base"]``. Optimizer state, EMA and checkpoints then hold adapters only.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.models import lora
from didr_jax.weights.mapping import flat_state, leaf_value

NETWORKS = ("generator", "ta")
ROLES = {"gen": "generator", "ta": "ta"}   # Task.params roles -> model.lora.networks names


@dataclasses.dataclass(frozen=True)
class LoraRun:
  rank: int
  scale: float                 # alpha / rank
  targets: dict                # {flax kernel path: diffusers module name}
  networks: tuple              # subset of NETWORKS
  prefix: str = "unet"         # PEFT key prefix diffusers' loaders expect (unet | transformer)

  def adapts(self, role: str) -> bool:
    return ROLES[role] in self.networks

  def abstract(self, base):
    """The adapters of ``base`` as ShapeDtypeStructs with shardings (restore targets, plans)."""
    shapes = jax.eval_shape(lambda: lora.init_adapters(base, self.targets, self.rank,
                                                       jax.random.PRNGKey(0)))
    shardings = adapter_shardings(base, shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

  def init(self, base, key):
    """Fresh adapters of ``base`` (B = 0: the adapted network equals its base), each placed like
    the kernel it adapts."""
    shardings = jax.tree.map(lambda x: x.sharding, self.abstract(base))
    return jax.jit(lambda k: lora.init_adapters(base, self.targets, self.rank, k),
                   out_shardings=shardings)(key)

  def merged(self, base, adapters):
    return lora.merge(base, adapters, self.scale)


def from_config(cfg, rules) -> LoraRun | None:
  """The run's LoRA setting checked against the network's mapping table ``rules``; None when
  ``model.lora.rank`` is 0. Raises ``lora.LoraError`` naming the field."""
  c = cfg.model.get("lora")     # absent from the config.json of runs older than LoRA
  if c is None:
    return None
  lora.check_rank(c.rank, c.alpha)
  if c.rank == 0:
    return None
  networks = tuple(c.networks)
  bad = [n for n in networks if n not in NETWORKS]
  if not networks or bad or len(set(networks)) != len(networks):
    raise lora.LoraError(f"model.lora.networks: {list(networks)}; name one or both of {list(NETWORKS)}")
  from didr_jax.pipelines.backbones import get
  return LoraRun(rank=c.rank, scale=c.alpha / c.rank, targets=lora.lora_targets(rules, tuple(c.targets)),
                 networks=networks, prefix=lora.peft_prefix(get(cfg.backbone).network_class))


def adapter_shardings(base, adapters):
  """Each factor sharded over the mesh axes of the kernel it adapts, on its own wide axis (A: the
  input axis, B: the output axis; the rank axis whole; leading layer / window axes as the
  kernel's): the kernel's axes where it shards that axis, else the kernel's other sharded axes
  when they divide it. FSDP then splits the adapters and their Adam moments as it splits the
  network, whichever kernel axis the rules shard."""
  kernels = {k: leaf_value(v) for k, v in flat_state(base).items()}

  def size(mesh, axes):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[n] for n in names]))

  def place(path):
    kernel = kernels[path]
    sh = kernel.sharding
    spec = tuple(sh.spec) + (None,) * (kernel.ndim - len(sh.spec))
    lead, (k_in, k_out) = spec[:-2], spec[-2:]
    d_in, d_out = kernel.shape[-2:]
    pick = lambda own, other, dim: own if own is not None else (
        other if other is not None and dim % size(sh.mesh, other) == 0 else None)
    b_lead = lead[:adapters[path]["b"].ndim - 2]   # a convolution's B [r, out] has no window axes
    return {"a": NamedSharding(sh.mesh, P(*lead, pick(k_in, k_out, d_in), None)),
            "b": NamedSharding(sh.mesh, P(*b_lead, None, pick(k_out, k_in, d_out)))}
  return {path: place(path) for path in adapters}


def network_params(run: LoraRun | None):
  """``Task.network_params`` of a run: (role, trainable, frozen) -> the role's network params."""
  if run is None:
    return None

  def params(role, trainable, frozen):
    if not run.adapts(role):
      return trainable
    base = frozen["gen_base"] if role == "gen" and "gen_base" in frozen else frozen["ref"]
    return run.merged(base, trainable)
  return params
