"""TrainState and optimizers, created directly with their target shardings."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax.models.layers import DTYPES


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # outer (generator) steps done
  gen_params: Any
  ta_params: Any
  gen_opt: Any
  ta_opt: Any
  gen_ema: Any             # None when EMA is off
  rng: jax.Array           # raw uint32[2] key (checkpoint-friendly)
  bad_steps: jax.Array     # consecutive non-finite (skipped) updates


@flax.struct.dataclass
class FitState:
  """State of a plain supervised fit (reference DSM pre-training, generator regression)."""
  step: jax.Array
  params: Any
  opt: Any
  rng: jax.Array


def make_optimizer(cfg) -> optax.GradientTransformation:
  """optax chain from a config group: name (adam|adamw), lr, b1, b2, eps, weight_decay,
  grad_clip (<= 0: off), warmup_steps, mu_dtype (float32|bfloat16)."""
  if cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  else:
    lr = cfg.lr
  if cfg.mu_dtype not in DTYPES:
    raise ValueError(f"mu_dtype {cfg.mu_dtype!r} unknown; choose one of {sorted(DTYPES)}")
  mu_dtype = DTYPES[cfg.mu_dtype]
  if cfg.name == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype)
  elif cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mu_dtype=mu_dtype)
  else:
    raise ValueError(f"optimizer name {cfg.name!r} unknown; choose adam or adamw")
  if cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def _opt_shardings(tx, params, mesh):
  """Shardings of tx.init(params) that follow the params (never replicated moments); ``params``
  may be arrays or ShapeDtypeStructs with shardings."""
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_sh,
                               transform_non_params=lambda _: NamedSharding(mesh, P()))


def sharded_opt_init(tx, params, mesh):
  """tx.init(params) jitted with out_shardings that follow the params."""
  return jax.jit(tx.init, out_shardings=_opt_shardings(tx, params, mesh))(params)


def abstract_train_state(*, gen_params, ta_params, gen_tx, ta_tx, ema: bool, mesh) -> TrainState:
  """The TrainState ``init_train_state`` would build, as ShapeDtypeStructs with its shardings and
  nothing allocated: the restore target of a resumed run (a fresh state next to the restored one
  would double the peak memory)."""
  def opt(tx, params):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(tx.init, params), _opt_shardings(tx, params, mesh))

  replicated = NamedSharding(mesh, P())
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  key = jax.eval_shape(jax.random.PRNGKey, 0)
  return TrainState(step=scalar, gen_params=abstract_of(gen_params), ta_params=abstract_of(ta_params),
                    gen_opt=opt(gen_tx, gen_params), ta_opt=opt(ta_tx, ta_params),
                    gen_ema=abstract_of(gen_params) if ema else None,
                    rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated), bad_steps=scalar)


def replicate(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P()))


def copy_tree(tree):
  """A fresh buffer for every leaf, keeping shardings (so donation of one copy spares the other)."""
  return jax.tree.map(lambda x: jnp.copy(x), tree)


def init_train_state(*, gen_params, ta_params, gen_tx, ta_tx, ema: bool, seed: int, mesh):
  return TrainState(
      step=replicate(jnp.zeros((), jnp.int32), mesh),
      gen_params=gen_params, ta_params=ta_params,
      gen_opt=sharded_opt_init(gen_tx, gen_params, mesh),
      ta_opt=sharded_opt_init(ta_tx, ta_params, mesh),
      gen_ema=jax.jit(copy_tree)(gen_params) if ema else None,
      rng=replicate(jax.random.PRNGKey(seed), mesh),
      bad_steps=replicate(jnp.zeros((), jnp.int32), mesh))


def init_fit_state(*, params, tx, seed: int, mesh):
  return FitState(step=replicate(jnp.zeros((), jnp.int32), mesh), params=params,
                  opt=sharded_opt_init(tx, params, mesh),
                  rng=replicate(jax.random.PRNGKey(seed), mesh))


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
  """ShapeDtypeStructs with shardings: restore targets and AOT inputs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
