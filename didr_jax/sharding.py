"""Meshes, logical->mesh axis rules and sharded creation of NNX models.

Models name logical axes only (``nnx.with_partitioning(init, ("embed", "mlp"))``). Which mesh axis
a logical name lands on is data (``RULES``, selected by name from config), so the same model code
runs replicated on one CPU device, data-parallel, or FSDP/tensor-parallel on a pod.

Every model must be created under :func:`model_context` (Flax's eager sharding refuses annotated
parameters without a mesh); :func:`create_sharded` creates the parameters directly with their
target sharding, so no full copy of a sharded model ever lives on one device.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by didr_jax models:
#   batch      - the example axis of activations
#   embed      - model width (the axis FSDP shards)
#   mlp        - hidden width of feed-forwards / output features of projections
#   heads      - attention heads
#   conv_in / conv_out - input / output channels of convolutions
#   norm       - scale/bias vectors (never sharded)
BATCH_AXES = ("data", "fsdp")   # the mesh axes the "batch" name lands on in every rule set
RULES: dict[str, tuple[tuple[str, object], ...]] = {
    "replicated": (
        ("batch", BATCH_AXES), ("embed", None), ("mlp", None), ("heads", None),
        ("conv_in", None), ("conv_out", None), ("norm", None), ("vocab", None),
    ),
    "fsdp": (
        ("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", None), ("heads", None),
        ("conv_in", None), ("conv_out", "fsdp"), ("norm", None), ("vocab", None),
    ),
    "fsdp_tp": (
        ("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
        ("conv_in", None), ("conv_out", "fsdp"), ("norm", None), ("vocab", None),
    ),
}


def get_rules(name: str):
  if name not in RULES:
    raise ValueError(f"sharding rules {name!r} unknown; choose one of {sorted(RULES)}")
  return RULES[name]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types; one -1 entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices), axis_names)
  return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
  """``shape`` with its -1 entry filled from ``num_devices``; ValueError when it cannot fit."""
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh.shape {tuple(shape)} has {len(shape)} entries but mesh.axes "
                     f"{tuple(axis_names)} has {len(axis_names)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: at most one entry may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if known < 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: entries must be positive (or one -1)")
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {tuple(shape)}: {num_devices} devices are not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"{num_devices} available")
  return tuple(shape)


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  return make_mesh((1, 1, 1), devices=[device or jax.devices()[0]])


@contextlib.contextmanager
def model_context(mesh: jax.sharding.Mesh, rules):
  """Mesh + logical rules in scope: where models are created, traced and restored."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def fit_shardings(abstract_state):
  """Replicate every dimension whose size the mesh axes assigned to it do not divide.

  E.g. a UNet ``conv_out`` with 4 output channels cannot be split 8 ways; jax refuses uneven
  shards, so that (small) dimension is kept whole on each device instead.
  """
  def fit(leaf):
    sh = leaf.sharding
    spec = tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec))
    new = []
    for size, axes in zip(leaf.shape, spec):
      names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
      ways = int(np.prod([sh.mesh.shape[a] for a in names], dtype=np.int64))
      new.append(axes if size % ways == 0 else None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(sh.mesh, P(*new)))
  return jax.tree.map(fit, abstract_state)


def abstract_model(make_model: Callable[[], nnx.Module], mesh, rules):
  """(graphdef, abstract state) whose leaves are ShapeDtypeStructs with NamedShardings, fitted
  so that every sharded dimension divides evenly (see :func:`fit_shardings`)."""
  with model_context(mesh, rules):
    graphdef, abs_state = nnx.get_abstract_model(make_model, mesh)
  return graphdef, fit_shardings(abs_state)


def state_shardings(abstract_state):
  return jax.tree.map(lambda x: x.sharding, abstract_state)


def create_sharded(make_model: Callable[[], nnx.Module], mesh, rules):
  """Initialise a model with every parameter born with its target sharding.

  Returns (graphdef, state). ``jax.jit`` alone does not keep the annotated shardings on outputs,
  so the abstract model's shardings are passed as ``out_shardings``.
  """
  graphdef, abs_state = abstract_model(make_model, mesh, rules)
  with model_context(mesh, rules):
    state = jax.jit(lambda: nnx.split(make_model())[1],
                    out_shardings=state_shardings(abs_state))()
  return graphdef, state


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis split over every data-like mesh axis (data and fsdp)."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def constrain_batch(x):
  """``x``'s leading (example) axis split over the current mesh's data-like axes (the other axes
  left to XLA), for activations at layer and block boundaries.

  Without it XLA's sharding propagation may keep activations whole and shard the contractions like
  the FSDP-sharded kernels instead, so every chip holds the global batch's activations (the
  full-size Z-Image TA step compiled for 64 chips held [64, 4608, 10240] feed-forward activations
  on each, the generator step the VAE's and the reward's for every image). Nothing changes without
  a mesh, on one device, or for a batch the axes do not divide."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.ndim == 0:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([P.UNCONSTRAINED] * (x.ndim - 1))))


def to_host(x) -> np.ndarray:
  """A global array as one host NumPy array on every process (gathers across processes if needed)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
