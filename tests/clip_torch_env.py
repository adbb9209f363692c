"""Import the PyTorch references (transformers CLIP, open_clip) in this CPU-only environment.

PyPI's torchvision wheels are CUDA builds. Next to the CPU torch wheel their C extension cannot
load, and torchvision's package ``__init__`` then dies registering fake kernels for its C++ ops
("operator torchvision::nms does not exist"). That breaks ``import open_clip`` and transformers'
CLIP modules, which import torchvision only for image transforms we never call. When (and only
when) that happens, we register the torchvision package without running its ``__init__``, so its
pure-Python submodules (transforms, ops.misc) still import. Import this module before transformers.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types


def _patch_torchvision():
  try:
    import torchvision  # noqa: F401
    return
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]
  spec = importlib.util.find_spec("torchvision")
  pkg = types.ModuleType("torchvision")
  pkg.__path__ = [os.path.dirname(spec.origin)]
  pkg.__spec__ = spec
  pkg.__file__ = spec.origin
  sys.modules["torchvision"] = pkg


_patch_torchvision()

import torch  # noqa: E402

torch.set_num_threads(1)


def open_clip():
  import open_clip as oc
  return oc
