"""Helpers for tests/test_t2i_pipeline.py: tiny configs, compiled generator chunks (cached per
pipeline and method), prompt conds, and fake diffusers folder layouts for validation tests."""
import json
import os

from configs.sdxl import get_config
from didr_jax.data import PromptSampler
from didr_jax.pipelines import experiment, tiny
from didr_jax.training.steps import compile_chunk, scan_chunk

_CHUNKS = {}


def fast_compiles():
  """XLA CPU compiles dominate the t2i tests; optimisations buy nothing at tiny shapes (use as a
  module-scoped autouse fixture)."""
  import jax
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def tiny_config(method: str):
  cfg = get_config("tiny")
  cfg.method = method
  return cfg


def sampler(cfg):
  return PromptSampler(experiment.prompts_of(cfg), global_batch=cfg.align.batch, seed=cfg.seed,
                       shuffle=cfg.data.shuffle)


def conds(pipe, step: int):
  return pipe.gen_conds(pipe.conds(sampler(pipe.cfg), step, 1))


def fresh_state(pipe, cfg):
  parts = experiment.build_training(pipe, cfg)
  return experiment.init_state(pipe, cfg, parts["gen_tx"], parts["ta_tx"])


def gen_chunk(pipe, cfg):
  """The ahead-of-time compiled one-step generator-update chunk, compiled once per (pipe, method)."""
  key = (id(pipe), cfg.method)
  if key not in _CHUNKS:
    parts = experiment.build_training(pipe, cfg)
    state = fresh_state(pipe, cfg)
    _CHUNKS[key] = compile_chunk(scan_chunk(parts["gen_update"], 1), state, pipe.frozen(),
                                 conds(pipe, 0), pipe.mesh, f"gen/{cfg.method}")
  return _CHUNKS[key]


def real_config(tmp_path, *, reference=None, generator="", reward=None, prompts="a cat\na dog\n",
                batch=8, unet_extra=None):
  """The real-run SDXL config over a fake folder layout holding only what validation reads."""
  root = str(tmp_path / "ref")
  unet_cfg = dict(tiny.unet_config("sdxl").to_dict(), **(unet_extra or {}))
  files = {"unet/config.json": unet_cfg, "vae/config.json": tiny.vae_config("sdxl").to_dict(),
           "text_encoder/config.json": {"model_type": "clip_text_model"},
           "text_encoder_2/config.json": {"model_type": "clip_text_model"},
           "tokenizer/vocab.json": {}, "tokenizer_2/vocab.json": {},
           "tokenizer/merges.txt": {}, "tokenizer_2/merges.txt": {}}
  for name, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    with open(os.path.join(root, name), "w") as f:
      json.dump(content, f)
  reward_dir = str(tmp_path / "reward")
  os.makedirs(reward_dir, exist_ok=True)
  prompt_file = str(tmp_path / "prompts.txt")
  with open(prompt_file, "w") as f:
    f.write(prompts)
  cfg = get_config("")
  cfg.model.reference = reference or root
  cfg.model.generator = generator
  cfg.reward.path = reward or reward_dir
  cfg.data.prompts = prompt_file
  cfg.align.batch = batch
  return cfg
