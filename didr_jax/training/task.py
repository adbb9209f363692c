"""The small interface between the trainer and a backbone (toy MLPs, SDXL UNets, ...)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from didr_jax.diffusion import Schedule, cfg as apply_cfg, to_denoiser


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything model-specific the alignment trainer needs; all callables are pure.

  generator_apply(gen_params, z, cond) -> x0         one-step generator, read out as x0
  network_apply(params, x_t, t, cond) -> output      architecture shared by the reference and TA
  reward_apply(frozen, x0, cond) -> r [B]            differentiable reward of clean samples
  uncond(cond) -> cond                               unconditional input for CFG (None: unconditional task)
  exact_drs(x_t, t, cond) -> DRS                     analytic DRS, when the prior allows it
  network_params(role, trainable, frozen) -> params  the network params of role "gen" or "ta" from
                                                     the state's trainable tree (LoRA: the frozen
                                                     base with the adapters merged); None: the
                                                     trainable tree is the network's params
  ``frozen`` is a pytree with at least ``frozen["ref"]`` (reference params) passed to every step.
  """
  schedule: Schedule
  prediction: str
  sample_shape: tuple
  generator_apply: Callable
  network_apply: Callable
  reward_apply: Callable
  ta_t_range: tuple
  gen_t_range: tuple
  uncond: Optional[Callable] = None
  exact_drs: Optional[Callable] = None
  network_params: Optional[Callable] = None

  def params(self, role: str, trainable, frozen):
    """What the generator ("gen") or the TA ("ta") network runs with, given the state's trainable
    tree of that role."""
    return trainable if self.network_params is None else self.network_params(role, trainable, frozen)

  def sample_t(self, key, n: int, t_range):
    lo, hi = t_range
    if self.schedule.kind == "discrete_vp":
      return jax.random.randint(key, (n,), int(lo), int(hi) + 1).astype(jnp.float32)
    return jax.random.uniform(key, (n,), jnp.float32, lo, hi)

  def denoiser(self, params, cfg_w: float = 0.0):
    """(x, t, cond, guided) -> (D, eps_hat); guided applies augmented CFG with scale cfg_w."""
    def denoise(x, t, cond, guided=False):
      a, s = self.schedule.alpha_sigma(t)
      if guided and cfg_w != 0.0:
        if self.uncond is None:
          raise ValueError("guidance (cfg_w != 0) needs a conditional task with an `uncond`")
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, self.uncond(cond))
        out = self.network_apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        out_c, out_u = jnp.split(out, 2)
        out = apply_cfg(out_c.astype(jnp.float32), out_u.astype(jnp.float32), cfg_w)
      else:
        out = self.network_apply(params, x, t, cond)
      return to_denoiser(out, x, a, s, self.prediction)
    return denoise


Frozen = Any
