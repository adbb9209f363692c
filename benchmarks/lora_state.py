"""Per-device bytes of the trainer's state for full fine-tuning vs LoRA, on the full-size networks.

Counted from the run's abstract shapes and shardings (nothing allocated, nothing compiled): the
trainable trees (generator + TA, each with Adam's two moments, + the generator's EMA: 7 copies of
what trains) and the frozen network weights (the reference, which under LoRA is also the base of
the TA and of a generator initialised from it: one copy). VAE, text encoders, reward and
activations are the same for both and left out (the compile plan, ``python -m didr_jax.plan``,
measures whole steps).

  python benchmarks/lora_state.py                               # the four networks, 1 and 8 devices
  python benchmarks/lora_state.py --ranks=8,32,128 --base_dtype=bfloat16
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.machine import LoadRecord  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from didr_jax import model_configs, sharding  # noqa: E402
from didr_jax.models import lora  # noqa: E402
from didr_jax.models.diffusers_loading import KINDS, ShapeOnlyRngs, _class_name  # noqa: E402
from didr_jax.models.layers import DTYPES  # noqa: E402
from didr_jax.pipelines.lora_training import LoraRun  # noqa: E402

NETWORKS = {"sdxl": "sdxl_unet", "sd15": "sd15_unet", "pixart": "pixart_transformer",
            "zimage": "zimage_transformer"}
COPIES = 7   # generator, TA, their Adam mu and nu, the generator's EMA


def per_device_bytes(tree) -> int:
  """Bytes of the largest per-device share of ``tree`` (ShapeDtypeStructs with shardings)."""
  total = {}
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    for d in leaf.sharding.device_set:
      total[d] = total.get(d, 0) + int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return max(total.values())


def network(name: str, mesh, base_dtype):
  config = model_configs.load(name)
  kind = KINDS[_class_name(config)]
  cfg = kind.config_cls.from_dict(config)
  _, state = sharding.abstract_model(
      lambda: kind.model_cls(cfg, param_dtype=base_dtype, rngs=ShapeOnlyRngs()), mesh,
      sharding.get_rules("fsdp"))
  return state, kind.rules(cfg)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--backbones", default="sdxl,sd15,pixart,zimage")
  p.add_argument("--ranks", default="8,32,128")
  p.add_argument("--devices", default="1,8")
  p.add_argument("--base_dtype", default="float32", help="the frozen base's dtype under LoRA")
  args = p.parse_args()
  record = LoadRecord()
  GiB = 2 ** 30
  print("| backbone | devices | setting | trainable params | trainable state GiB/device "
        "| frozen weights GiB/device | total GiB/device |")
  print("|---|---|---|---|---|---|---|")
  for backbone in args.backbones.split(","):
    for n in (int(d) for d in args.devices.split(",")):
      mesh = sharding.make_mesh((1, n, 1), devices=jax.devices()[:n])
      full, rules = network(NETWORKS[backbone], mesh, DTYPES["float32"])
      count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full))
      trainable, frozen = COPIES * per_device_bytes(full), per_device_bytes(full)
      print(f"| {backbone} | {n} | full fine-tuning | {count / 1e6:.0f}M | {trainable / GiB:.2f} | "
            f"{frozen / GiB:.2f} | {(trainable + frozen) / GiB:.2f} |")
      base, _ = network(NETWORKS[backbone], mesh, DTYPES[args.base_dtype])
      targets = lora.lora_targets(rules, lora.default_targets(_class_name(model_configs.load(NETWORKS[backbone]))))
      for r in (int(v) for v in args.ranks.split(",")):
        adapters = LoraRun(rank=r, scale=1.0, targets=targets, networks=("generator", "ta")).abstract(base)
        a_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
        trainable, frozen = COPIES * per_device_bytes(adapters), per_device_bytes(base)
        print(f"| {backbone} | {n} | LoRA r={r}, {args.base_dtype} base | {a_count / 1e6:.1f}M | "
              f"{trainable / GiB:.2f} | {frozen / GiB:.2f} | {(trainable + frozen) / GiB:.2f} |")
  record.done()


if __name__ == "__main__":
  main()
