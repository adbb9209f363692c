"""A tiny toy alignment run shared by the trainer tests and their subprocess worker."""
import jax
import numpy as np

from configs.toy import get_config
from didr_jax.toy import experiment
from didr_jax.training.checkpoint import Checkpointer


def tiny_config(method: str, steps: int):
  cfg = get_config("fast")
  cfg.methods = (method,)
  cfg.network.width = 16
  cfg.generator.width = 16
  cfg.network.depth = 2
  cfg.generator.depth = 2
  cfg.align.batch = 64
  cfg.align.k_ta = 2
  cfg.align.steps = steps
  cfg.align.ema_decay = 0.9
  cfg.align.gen_optimizer.lr = 1e-3     # pinned: independent of the fast variant's choices
  cfg.align.ta_optimizer.lr = 3e-4
  cfg.train.steps_per_chunk = 2
  cfg.checkpoint.every_steps = 2
  cfg.checkpoint.async_save = False
  return cfg


def run_alignment(cfg, method, ckpt_dir=None, devices=None):
  """Alignment from the networks' initial parameters (pre-training is not what these tests check)."""
  toy = experiment.Toy(cfg, devices=devices)
  ckpt = None
  if ckpt_dir:
    ckpt = Checkpointer(ckpt_dir, identity=experiment.identities(cfg)[method], max_to_keep=2,
                        save_every=cfg.checkpoint.every_steps, async_save=False)
  state = experiment.align(toy, method, toy.ref_init, toy.gen_init, ckpt, None, None)
  if ckpt is not None:
    ckpt.close()
  return state


def dump_state(state) -> dict:
  """{path: host array} of the whole TrainState (replicated leaves read from the local shard)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    out[key] = np.asarray(leaf.addressable_data(0)) if leaf.is_fully_replicated else np.asarray(leaf)
  return out
