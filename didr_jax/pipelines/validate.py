"""Fail-fast checks of a t2i config, before any model is built or compiled: one line naming the
field, file or key and what is expected."""
from __future__ import annotations

import json
import os

import jax

from didr_jax.config_checks import check_mesh, fail as _fail
from didr_jax.errors import ConfigError  # re-exported: validate.ConfigError
from didr_jax.models.layers import DTYPES
from didr_jax.objectives.generator import CFG_PLACEMENTS, METHODS, WEIGHTINGS
from didr_jax.pipelines.experiment import objective_config

TINY_REWARD = "tiny_pickscore"
LAYOUT = {
    "sdxl": ("unet/", "vae/", "text_encoder/", "text_encoder_2/", "tokenizer/", "tokenizer_2/"),
    "sd15": ("unet/", "vae/", "text_encoder/", "tokenizer/"),
}
FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
         "text_encoder_2": "config.json", "tokenizer": "vocab.json", "tokenizer_2": "vocab.json"}


def _json(path, field):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    _fail(field, f"{path}: unreadable JSON ({e})")


def check_unet_config(config: dict, backbone: str, field: str, where: str):
  """The UNet must match the backbone: SDXL needs text_time conditioning, SD1.5 must not have it."""
  if config.get("_class_name") != "UNet2DConditionModel":
    _fail(field, f"{where}: _class_name {config.get('_class_name')!r}, expected 'UNet2DConditionModel'")
  add = config.get("addition_embed_type")
  if backbone == "sdxl" and add != "text_time":
    _fail(field, f"{where}: addition_embed_type={add!r}; an SDXL UNet has 'text_time' "
                 "(is this an SD1.5 UNet? use configs/sd15.py)")
  if backbone == "sd15" and add is not None:
    _fail(field, f"{where}: addition_embed_type={add!r}; an SD1.5 UNet has none (use configs/sdxl.py)")


def check_model_paths(cfg):
  """model.reference (a diffusers folder of the backbone) and model.generator, when set."""
  m, backbone = cfg.model, cfg.backbone
  layout = ", ".join(LAYOUT[backbone])
  if not m.reference:
    _fail("model.reference", f"not set; expected a diffusers folder with {layout}")
  if not os.path.isdir(m.reference):
    _fail("model.reference", f"{m.reference}: folder not found; expected a diffusers folder with {layout}")
  for sub in LAYOUT[backbone]:
    path = os.path.join(m.reference, sub, FILES[sub.rstrip("/")])
    if not os.path.isfile(path):
      _fail("model.reference", f"{path} missing; expected a diffusers folder with {layout}")
  ref_cfg = _json(os.path.join(m.reference, "unet", "config.json"), "model.reference")
  check_unet_config(ref_cfg, backbone, "model.reference", os.path.join(m.reference, "unet"))
  if m.generator:
    if os.path.isdir(m.generator):
      path = os.path.join(m.generator, "config.json")
      if not os.path.isfile(path):
        _fail("model.generator", f"{path} missing; expected a diffusers UNet folder (config.json + "
                                 "diffusion_pytorch_model.safetensors) or one .safetensors file")
      gen_cfg = _json(path, "model.generator")
      check_unet_config(gen_cfg, backbone, "model.generator", m.generator)
      for k in ("block_out_channels", "cross_attention_dim", "down_block_types"):
        if gen_cfg.get(k) != ref_cfg.get(k):
          _fail("model.generator", f"{m.generator}: {k}={gen_cfg.get(k)} differs from the "
                                   f"reference's {ref_cfg.get(k)}")
    elif not (os.path.isfile(m.generator) and m.generator.endswith(".safetensors")):
      _fail("model.generator", f"{m.generator}: not found; expected a diffusers UNet folder or a "
                               ".safetensors file in diffusers naming")


def _check_paths(cfg):
  check_model_paths(cfg)
  r = cfg.reward
  if not r.path or not os.path.exists(r.path):
    _fail("reward.path", f"{r.path or '<unset>'}: not found; expected the weights of reward "
                         f"{r.name!r} (README.md, section 'Rewards')")
  for k in ("clip", "tokenizer"):
    v = getattr(r, k)
    if v and not os.path.exists(v):
      _fail(f"reward.{k}", f"{v}: not found")
  if r.name == "aesthetic" and not r.clip:
    _fail("reward.clip", "the aesthetic reward needs the CLIP ViT-L/14 (a transformers folder)")


def _check_prompts(cfg):
  from didr_jax.data import PromptDataError, load_prompts
  if cfg.variant == "tiny" and not cfg.data.prompts:
    if not cfg.tiny.prompts:
      _fail("tiny.prompts", "empty")
    return
  if not cfg.data.prompts:
    _fail("data.prompts", "not set; expected a prompt file (txt, jsonl, Parti TSV or COCO json)")
  try:
    load_prompts(cfg.data.prompts, format=cfg.data.format, field=cfg.data.field)
  except PromptDataError as e:
    _fail("data.prompts", str(e))


def _check_batch(cfg, num_devices=None):
  shape = check_mesh(cfg, ("align.batch",), num_devices)
  ways = shape[0] * shape[1]
  b = cfg.align.batch
  if b < 1:
    _fail("align.batch", f"must be >= 1, got {b}")
  if b % jax.process_count():
    _fail("align.batch", f"{b} is not divisible by {jax.process_count()} processes")
  m = cfg.align.grad_accum
  if m < 1 or b % (m * ways):
    _fail("align.grad_accum", f"{m}: the batch {b} must split into {m} microbatches each divisible "
                              f"by data x fsdp = {ways} devices")
  rows, micro = cfg.objective.snis_rows, b // max(m, 1)
  if 0 < rows < micro and micro % rows:
    _fail("objective.snis_rows", f"{rows} must divide the microbatch of {micro} rows (or be 0)")
  w, steps, n = cfg.align.ta_warmup_steps, cfg.align.steps, cfg.train.steps_per_chunk
  if w < 0 or w >= steps:
    _fail("align.ta_warmup_steps", f"{w}: expected 0 <= warm-up < align.steps = {steps}")
  if w % n:
    _fail("align.ta_warmup_steps", f"{w}: must be a multiple of train.steps_per_chunk = {n}")


def _check_enums(cfg):
  from didr_jax.models.attention import ATTENTION_IMPLEMENTATIONS
  from didr_jax.models.remat import REMAT_POLICIES
  from didr_jax.rewards import REWARD_NAMES
  if cfg.model.attention not in ATTENTION_IMPLEMENTATIONS:
    _fail("model.attention", f"{cfg.model.attention!r} unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
  if cfg.model.remat not in REMAT_POLICIES:
    _fail("model.remat", f"{cfg.model.remat!r} unknown; choose one of {REMAT_POLICIES}")
  if cfg.variant == "tiny":
    if cfg.reward.name != TINY_REWARD:
      _fail("reward.name", f"{cfg.reward.name!r}: the :tiny variant builds its own random CLIP reward "
                           f"{TINY_REWARD!r}; real rewards need a real run")
  elif cfg.reward.name not in REWARD_NAMES:
    _fail("reward.name", f"{cfg.reward.name!r} unknown; choose one of {REWARD_NAMES}")


def validate(cfg, num_devices: int | None = None, check_inputs: bool = True) -> None:
  """Every field of a t2i config; ``num_devices``: the mesh's devices (default this run's);
  ``check_inputs``: also the model folders and the prompt file (off for the compile plan, which
  reads neither)."""
  if cfg.method not in METHODS:
    _fail("method", f"{cfg.method!r} unknown; choose one of {METHODS}")
  o = cfg.objective
  if o.weighting not in WEIGHTINGS:
    _fail("objective.weighting", f"{o.weighting!r} unknown; choose one of {WEIGHTINGS}")
  if o.cfg_placement not in CFG_PLACEMENTS:
    _fail("objective.cfg_placement", f"{o.cfg_placement!r} unknown; choose one of {CFG_PLACEMENTS}")
  if o.beta <= 0:
    _fail("objective.beta", f"must be > 0, got {o.beta}")
  try:
    objective_config(cfg)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  _check_enums(cfg)
  if not 0 <= cfg.model.label_t <= 999:
    _fail("model.label_t", f"must be in 0..999, got {cfg.model.label_t}")
  for name in ("ta_t_range", "gen_t_range"):
    lo, hi = getattr(cfg.align, name)
    if not 0 <= lo <= hi <= 999:
      _fail(f"align.{name}", f"({lo}, {hi}) must satisfy 0 <= lo <= hi <= 999")
  if cfg.align.k_ta < 1:
    _fail("align.k_ta", f"must be >= 1 (TA updates per generator update), got {cfg.align.k_ta}")
  if cfg.data.resolution % 8:
    _fail("data.resolution", f"{cfg.data.resolution} is not a multiple of 8 (VAE factor)")
  for dt in ("dtype", "param_dtype", "vae_dtype"):
    if getattr(cfg.model, dt) not in DTYPES:
      _fail(f"model.{dt}", f"{getattr(cfg.model, dt)!r}: choose one of {sorted(DTYPES)}")
  for opt in ("ta_optimizer", "gen_optimizer"):
    if cfg.align[opt].mu_dtype not in DTYPES:
      _fail(f"align.{opt}.mu_dtype", f"{cfg.align[opt].mu_dtype!r}: choose one of {sorted(DTYPES)}")
  if cfg.train.steps_per_chunk < 1:
    _fail("train.steps_per_chunk", f"must be >= 1, got {cfg.train.steps_per_chunk}")
  if cfg.align.steps % cfg.train.steps_per_chunk:
    _fail("align.steps", f"{cfg.align.steps} is not a multiple of train.steps_per_chunk "
                         f"{cfg.train.steps_per_chunk}")
  _check_batch(cfg, num_devices)
  if not check_inputs:
    return
  if cfg.variant != "tiny":
    _check_paths(cfg)
  _check_prompts(cfg)
