"""The one check every model config uses: a ValueError naming the config and the field."""
from __future__ import annotations


def check_field(cond: bool, field: str, msg: str, where: str = "config"):
  """``ValueError("<where> field '<field>': <msg>")`` unless ``cond``."""
  if not cond:
    raise ValueError(f"{where} field {field!r}: {msg}")
