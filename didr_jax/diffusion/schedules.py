"""Forward processes x_t = a_t x0 + s_t eps (docs/method.md section 1.1).

A :class:`Schedule` is a hashable, static description (closed over by jitted code); ``alpha_sigma``
is a pure jnp function of t, so it works under jit, vmap and grad.
  discrete_vp    : t in {0..T-1} (int or float index), a = sqrt(abar_t), s = sqrt(1 - abar_t)
  continuous_vp  : t in [0, 1], log a_t = -0.5 int_0^t beta(u) du (linear beta) or cosine
  rectified_flow : t in [0, 1], sigma = shift t / (1 + (shift - 1) t), a = 1 - sigma, s = sigma
                   (``shift`` 1: t = sigma; FlowMatchEulerDiscreteScheduler's time shift otherwise,
                   so uniform t draws the shifted noise levels the checkpoint was trained on)
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

KINDS = ("discrete_vp", "continuous_vp", "rectified_flow")


@dataclasses.dataclass(frozen=True)
class Schedule:
  kind: str
  betas: str = ""                  # discrete_vp: scaled_linear (default) | linear; continuous_vp: linear (default) | cosine
  beta_start: float = 0.00085      # discrete_vp
  beta_end: float = 0.012          # discrete_vp
  num_train_timesteps: int = 1000  # discrete_vp
  beta_min: float = 0.1            # continuous_vp linear
  beta_max: float = 20.0           # continuous_vp linear
  cosine_s: float = 0.008          # continuous_vp cosine
  shift: float = 1.0               # rectified_flow time shift (Z-Image: 3.0 Turbo, 6.0 base)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"schedule.kind {self.kind!r} unknown; choose one of {KINDS}")
    if not self.betas:
      object.__setattr__(self, "betas", {"discrete_vp": "scaled_linear", "continuous_vp": "linear",
                                         "rectified_flow": "none"}[self.kind])
    allowed = {"discrete_vp": ("scaled_linear", "linear"), "continuous_vp": ("linear", "cosine"),
               "rectified_flow": (self.betas,)}[self.kind]
    if self.betas not in allowed:
      raise ValueError(f"schedule.betas {self.betas!r} not valid for {self.kind}; choose {allowed}")
    if not self.shift > 0 or (self.shift != 1.0 and self.kind != "rectified_flow"):
      raise ValueError(f"schedule.shift {self.shift!r}: a positive time shift of rectified_flow "
                       f"(1.0 for {self.kind})")

  @property
  def t_range(self) -> tuple[float, float]:
    """The domain of t: (0, T-1) for discrete schedules, (0, 1) otherwise."""
    return (0.0, float(self.num_train_timesteps - 1)) if self.kind == "discrete_vp" else (0.0, 1.0)

  def alphas_cumprod(self) -> np.ndarray:
    """abar_t for the discrete VP schedule, computed as diffusers does (float64 -> float32)."""
    n = self.num_train_timesteps
    if self.betas == "scaled_linear":
      betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:
      betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
    return np.cumprod(1.0 - betas).astype(np.float32)

  def alpha_sigma(self, t):
    """(a_t, s_t) with the shape of t, float32."""
    t = jnp.asarray(t)
    if self.kind == "discrete_vp":
      abar = jnp.asarray(self.alphas_cumprod())
      # Linear interpolation in t lets float timesteps through; integers index exactly.
      tf = jnp.clip(t.astype(jnp.float32), 0.0, self.num_train_timesteps - 1.0)
      lo = jnp.floor(tf).astype(jnp.int32)
      hi = jnp.minimum(lo + 1, self.num_train_timesteps - 1)
      frac = tf - lo
      ab = abar[lo] * (1 - frac) + abar[hi] * frac
      return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    if self.kind == "rectified_flow":
      sigma = t if self.shift == 1.0 else self.shift * t / (1.0 + (self.shift - 1.0) * t)
      return 1.0 - sigma, sigma
    if self.betas == "linear":
      log_a = -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
    else:
      f = lambda u: jnp.cos((u + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2)
      log_a = jnp.log(f(t) / f(jnp.zeros_like(t)))
    a = jnp.exp(log_a)
    # s = sqrt(1 - a^2) computed as sqrt(-expm1(2 log a)) for accuracy at small t.
    return a, jnp.sqrt(-jnp.expm1(2.0 * log_a))


def make_schedule(cfg) -> Schedule:
  """Build from a config group with the dataclass's field names."""
  fields = {f.name for f in dataclasses.fields(Schedule)}
  values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"schedule: unknown field(s) {unknown}; known: {sorted(fields)}")
  return Schedule(**values)
