"""Fail-fast checks of a t2i config, before any model is built or compiled: one line naming the
field, file or key and what is expected."""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from didr_jax.config_checks import check_mesh, fail as _fail
from didr_jax.errors import ConfigError  # re-exported: validate.ConfigError
from didr_jax.models.layers import DTYPES
from didr_jax.objectives.generator import CFG_PLACEMENTS, METHODS, WEIGHTINGS
from didr_jax.pipelines.experiment import objective_config

TINY_REWARD = "tiny_pickscore"
# files a tokenizer folder of each text family must hold (any one of each tuple)
TOKENIZER_FILES = {"clip": (("vocab.json",), ("merges.txt",)),
                   "t5": (("tokenizer.json", "spiece.model"),),
                   "qwen3": (("tokenizer.json",), ("tokenizer_config.json",))}


def layout(backbone) -> tuple:
  """The folders of the backbone's diffusers pipeline the run reads."""
  subs = [backbone.network_folder, "vae"] + [e for e, _ in backbone.towers] + [t for _, t in backbone.towers]
  return tuple(f"{s}/" for s in subs)


def _json(path, field):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    _fail(field, f"{path}: unreadable JSON ({e})")


def check_network_config(config: dict, backbone, field: str, where: str):
  """The network must be the backbone's: its class, and for the UNets SDXL's text_time
  conditioning (SD1.5 must not have it)."""
  from didr_jax.models.diffusers_loading import _class_name
  name = _class_name(config)
  if name != backbone.network_class:
    _fail(field, f"{where}: _class_name {config.get('_class_name')!r}, expected "
                 f"{backbone.network_class!r} for backbone {backbone.name!r}")
  if name != "UNet2DConditionModel":
    return
  add = config.get("addition_embed_type")
  if backbone.name == "sdxl" and add != "text_time":
    _fail(field, f"{where}: addition_embed_type={add!r}; an SDXL UNet has 'text_time' "
                 "(is this an SD1.5 UNet? use configs/sd15.py)")
  if backbone.name == "sd15" and add is not None:
    _fail(field, f"{where}: addition_embed_type={add!r}; an SD1.5 UNet has none (use configs/sdxl.py)")


def _check_text_folders(reference: str, backbone):
  from didr_jax.errors import ConfigError as _E
  from didr_jax.models import text_family
  want = backbone.text.split("_")[0]
  for enc, tok in backbone.towers:
    folder = os.path.join(reference, enc)
    try:
      family = text_family(folder)
    except (ValueError, OSError) as e:
      raise _E(f"config.model.reference: {e}") from None
    if family != want:
      _fail("model.reference", f"{folder}: a {family} text encoder; backbone {backbone.name!r} "
                               f"reads {want}")
    for options in TOKENIZER_FILES[family]:
      if not any(os.path.isfile(os.path.join(reference, tok, n)) for n in options):
        _fail("model.reference", f"{os.path.join(reference, tok)}: tokenizer file "
                                 f"{' or '.join(options)} missing ({family} tokenizer)")


def _check_scheduler(reference: str, backbone):
  """A VP reference's scheduler config (when shipped) must have the backbone's betas."""
  path = os.path.join(reference, "scheduler", "scheduler_config.json")
  if backbone.flow or not os.path.isfile(path):
    return
  d, sch = _json(path, "model.reference"), backbone.schedule
  want = {"beta_schedule": sch.betas, "beta_start": sch.beta_start, "beta_end": sch.beta_end}
  for k, v in want.items():
    got = d.get(k, v)
    if got != v and not (isinstance(v, float) and isinstance(got, (int, float)) and abs(got - v) < 1e-9):
      _fail("model.reference", f"{path}: {k}={got!r}, but backbone {backbone.name!r} trains on "
                               f"{v!r}")


def check_model_paths(cfg):
  """model.reference (a diffusers folder of the backbone) and model.generator, when set."""
  from didr_jax.pipelines.backbones import get
  m, backbone = cfg.model, get(cfg.backbone)
  net = backbone.network_folder
  folders = ", ".join(layout(backbone))
  if not m.reference:
    _fail("model.reference", f"not set; expected a diffusers folder with {folders}")
  if not os.path.isdir(m.reference):
    _fail("model.reference", f"{m.reference}: folder not found; expected a diffusers folder with {folders}")
  for sub in layout(backbone):
    path = os.path.join(m.reference, sub)
    if not os.path.isdir(path):
      _fail("model.reference", f"{path} missing; expected a diffusers folder with {folders}")
  for sub in [net, "vae"] + [enc for enc, _ in backbone.towers]:
    path = os.path.join(m.reference, sub, "config.json")
    if not os.path.isfile(path):
      _fail("model.reference", f"{path} missing; expected a diffusers folder with {folders}")
  ref_cfg = _json(os.path.join(m.reference, net, "config.json"), "model.reference")
  check_network_config(ref_cfg, backbone, "model.reference", os.path.join(m.reference, net))
  _check_text_folders(m.reference, backbone)
  _check_scheduler(m.reference, backbone)
  if m.generator:
    if os.path.isdir(m.generator):
      path = os.path.join(m.generator, "config.json")
      if not os.path.isfile(path):
        _fail("model.generator", f"{path} missing; expected a diffusers {net} folder (config.json + "
                                 "diffusion_pytorch_model.safetensors) or one .safetensors file")
      gen_cfg = _json(path, "model.generator")
      check_network_config(gen_cfg, backbone, "model.generator", m.generator)
      keys = (("block_out_channels", "cross_attention_dim", "down_block_types") if net == "unet" else
              sorted(k for k in set(ref_cfg) | set(gen_cfg) if not k.startswith("_")))
      for k in keys:
        if gen_cfg.get(k) != ref_cfg.get(k):
          _fail("model.generator", f"{m.generator}: {k}={gen_cfg.get(k)} differs from the "
                                   f"reference's {ref_cfg.get(k)}")
    elif not (os.path.isfile(m.generator) and m.generator.endswith(".safetensors")):
      _fail("model.generator", f"{m.generator}: not found; expected a diffusers {net} folder or a "
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
    _check_prompt_lengths(cfg, list(cfg.tiny.prompts), "tiny.prompts")
    return
  if not cfg.data.prompts:
    _fail("data.prompts", "not set; expected a prompt file (txt, jsonl, Parti TSV or COCO json)")
  try:
    prompts = load_prompts(cfg.data.prompts, format=cfg.data.format, field=cfg.data.field)
  except PromptDataError as e:
    _fail("data.prompts", str(e))
  _check_prompt_lengths(cfg, prompts, "data.prompts")


def _check_prompt_lengths(cfg, prompts, field):
  """The DiT backbones' text encoders read a fixed number of tokens (T5: 120, Qwen3: 512, as their
  pipelines): a longer prompt would be cut without a word, so it is refused instead."""
  from didr_jax.pipelines.backbones import get
  family = get(cfg.backbone).text
  if family not in ("t5", "qwen3"):
    return                      # CLIP's 77 tokens: truncated as every SD pipeline does
  if cfg.variant == "tiny":
    from didr_jax.pipelines import tiny
    tok = tiny.tokenizer(cfg.backbone)
  else:
    from didr_jax.pipelines.t2i import load_tokenizer
    tok = load_tokenizer(family, os.path.join(cfg.model.reference, get(cfg.backbone).towers[0][1]))
  lengths = tok.lengths(prompts)
  long = np.flatnonzero(lengths > tok.max_length)
  if long.size:
    i = int(long[0])
    _fail(field, f"prompt {i} ({prompts[i][:40]!r}...) has {lengths[i]} tokens; the {family} "
                 f"tokenizer keeps {tok.max_length} ({long.size} prompt(s) too long); shorten them")


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


def _check_times(cfg):
  """label_t and the t ranges in the schedule's domain (timesteps 0..999, or [0, 1] on the flow)."""
  from didr_jax.pipelines.backbones import get
  backbone = get(cfg.backbone)
  if backbone.flow and not cfg.model.time_shift > 0:
    _fail("model.time_shift", f"must be > 0, got {cfg.model.time_shift}")
  t0, t1 = backbone.schedule.t_range
  hi_name = f"{t1:g}"
  if not t0 <= cfg.model.label_t <= t1:
    _fail("model.label_t", f"must be in {t0:g}..{hi_name}, got {cfg.model.label_t}")
  for name in ("ta_t_range", "gen_t_range"):
    lo, hi = getattr(cfg.align, name)
    if not t0 <= lo <= hi <= t1:
      _fail(f"align.{name}", f"({lo}, {hi}) must satisfy {t0:g} <= lo <= hi <= {hi_name}")
  if backbone.flow:
    lo, hi = cfg.align.gen_t_range
    if lo <= 0 or hi >= 1:
      _fail("align.gen_t_range", f"({lo}, {hi}): on the flow the generator's weights divide by "
                                 "a = 1 - sigma and s = sigma; keep 0 < lo <= hi < 1")


def _check_lora(cfg):
  """model.lora: rank, alpha and networks, and every target pattern matching a linear or
  convolution layer of the generator's network (its config.json, or the tiny one)."""
  from didr_jax.models import lora
  from didr_jax.pipelines.export_checkpoint import lora_of_generator
  if cfg.model.lora.rank == 0:
    return
  try:
    lora_of_generator(cfg)
  except lora.LoraError as e:
    raise ConfigError(f"config.{e}") from None


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
  _check_times(cfg)
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
  _check_lora(cfg)
  _check_prompts(cfg)
