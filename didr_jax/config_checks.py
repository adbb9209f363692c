"""Checks every experiment's ``validate`` shares: one ConfigError line naming the field."""
from __future__ import annotations

import jax

from didr_jax.errors import ConfigError
from didr_jax.sharding import RULES, resolve_mesh_shape


def fail(field: str, reason: str):
  raise ConfigError(f"config.{field}: {reason}")


def check_mesh(cfg, batch_fields, num_devices: int | None = None) -> tuple[int, ...]:
  """``mesh.rules`` known, ``mesh.shape`` fits the devices (``num_devices``, default this run's),
  and every ``batch_fields`` entry ("group.key") divisible by the batch devices (data x fsdp);
  returns the resolved shape."""
  if cfg.mesh.rules not in RULES:
    fail("mesh.rules", f"unknown {cfg.mesh.rules!r}; choose from {sorted(RULES)}")
  try:
    shape = resolve_mesh_shape(tuple(cfg.mesh.shape), num_devices or jax.device_count())
  except ValueError as e:
    fail("mesh.shape", str(e))
  batch_devices = shape[0] * shape[1]
  for name in batch_fields:
    group, key = name.split(".")
    if cfg[group][key] % batch_devices:
      fail(name, f"{cfg[group][key]} is not divisible by the mesh's data x fsdp = {batch_devices} devices")
  return shape
