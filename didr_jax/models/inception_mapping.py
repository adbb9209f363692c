"""Explicit weight table from pytorch-fid's FID Inception checkpoint into ``inception.py``'s tree.

The source is ``pt_inception-2015-12-05-6726825d.pth``: the state dict of pytorch-fid's
``fid_inception_v3()`` (every ``BasicConv2d`` as ``conv.weight`` + ``bn.{weight, bias,
running_mean, running_var}``, plus the 1008-way ``fc`` classifier). It is a pickle, so it is
converted to safetensors once with ``python -m didr_jax.convert`` (needs torch); runtime
loading reads only the safetensors file.

Two kinds of keys are allowed to be present without being used, by exact name (``ALLOWED_UNUSED``):
``fc.weight`` / ``fc.bias`` (the classifier after pool3, which FID does not use) and each BatchNorm's
``num_batches_tracked`` (a training counter; torch writes it, older exports may omit it). Any other
missing, unused or mis-shaped key raises ``WeightMismatchError``.
"""
from __future__ import annotations

from flax import nnx

from didr_jax.models.clip_loading import materialise
from didr_jax.models.inception import InceptionV3
from didr_jax.weights import Rule, read_safetensors

STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
# The BasicConv2d children of each block type, in torchvision's naming.
BRANCHES = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
BLOCKS = (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
          ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
          ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E"))


def basic_conv_paths() -> list[str]:
  """Every BasicConv2d of the FID Inception (94), as a dotted path shared by both trees."""
  return list(STEM) + [f"{name}.{b}" for name, kind in BLOCKS for b in BRANCHES[kind]]


def inception_rules() -> list[Rule]:
  """conv OIHW -> HWIO; BatchNorm weight/bias/running stats -> scale/bias/mean/var."""
  rules = []
  for p in basic_conv_paths():
    rules += [Rule(f"{p}.conv.kernel", f"{p}.conv.weight", "conv"),
              Rule(f"{p}.bn.scale", f"{p}.bn.weight"), Rule(f"{p}.bn.bias", f"{p}.bn.bias"),
              Rule(f"{p}.bn.mean", f"{p}.bn.running_mean"),
              Rule(f"{p}.bn.var", f"{p}.bn.running_var")]
  return rules


ALLOWED_UNUSED = frozenset(["fc.weight", "fc.bias"]
                           + [f"{p}.bn.num_batches_tracked" for p in basic_conv_paths()])


def inception_from_tensors(tensors, what: str, *, mesh=None, rules=None) -> InceptionV3:
  """Our InceptionV3 filled from {torch key: array}; raises WeightMismatchError on any mismatch."""
  used = {k: v for k, v in tensors.items() if k not in ALLOWED_UNUSED}
  return materialise(lambda: InceptionV3(rngs=nnx.Rngs(0)), used, inception_rules(), what,
                     mesh, rules)


def load_inception(path: str, *, mesh=None, rules=None) -> InceptionV3:
  """The FID InceptionV3 from a safetensors file (``python -m didr_jax.convert`` of the .pth)."""
  return inception_from_tensors(read_safetensors(path), path, mesh=mesh, rules=rules)
