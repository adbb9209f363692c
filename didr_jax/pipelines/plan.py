"""Compile a t2i run's real steps for a TPU topology on a machine without one, and report whether
they fit ("deviceless" ahead-of-time compilation with libtpu, run under ``JAX_PLATFORMS=cpu``).

The models are built as shapes only (ShapeDtypeStructs with the run's shardings) from the
full-size configs shipped in ``didr_jax.model_configs`` (or, for ``:tiny``, the tiny ones); no
weights are read. The run's own step functions (``build_training``) are lowered with the run's
mesh, rules and in/out shardings, and XLA's TPU compiler reports per-device memory and cost:

* ``ta``: one TA update; ``generator``: one generator update; ``outer``: the chunk the run
  executes (``train.steps_per_chunk`` outer steps of k_ta TA updates + one generator update).
* ``flops``: the program's matmul and convolution FLOPs with every loop counted as often as it
  runs (``hlo_flops``: scanned layer stacks, the DRP's steps, the chunk's outer steps), read from
  the lowered program and divided by the chips (the batch is sharded over all of them);
  ``xla_cost_flops`` is XLA's cost analysis of the compiled per-chip program, which counts each
  loop body once. Per outer step: generator + k_ta x ta. ``bytes_accessed`` is XLA's (loop bodies
  once: a lower bound).
* Each program is compiled with the chip's HBM as XLA's limit; for one that XLA cannot fit,
  ``oom`` holds XLA's message, ``fits`` is false and the figures are estimated (``source``).
* Estimated step time: the roofline max(FLOPs / peak, bytes / HBM bandwidth) from the chip's
  published figures (``CHIPS``); the MFU ceiling is FLOPs / peak over that time. Collectives and
  overlap are not modelled: the estimate is a lower bound on the step time.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax import model_configs, sharding
from didr_jax.errors import ConfigError
from didr_jax.models.layers import DTYPES
from didr_jax.pipelines.hlo_flops import program_flops

GiB = 2 ** 30


class PlanError(ConfigError):
  """Bad input to the compile plan (topology, libtpu, mesh): one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_bf16_flops: float   # per chip, FLOP/s
  hbm_bytes: int           # per chip
  hbm_bytes_per_s: float   # per chip
  source: str


# Per-chip figures as Google publishes them (Cloud TPU system architecture pages).
CHIPS = {
    "v4": Chip(275e12, 32 * GiB, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(197e12, 16 * GiB, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 95 * GiB, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 32 * GiB, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
OOM_TEMPORARIES = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")


def topology_devices(name: str):
  """(chip, devices) of a TPU topology such as ``v5p:4x4x4`` (no TPU needed, libtpu is)."""
  if not TOPOLOGY.match(name):
    raise PlanError(f"--topology={name!r}: expected <chip>:<AxB[xC]> with chip one of "
                    f"{sorted(CHIPS)}, e.g. v5p:4x4x4 or v5e:4x4")
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError(f"--topology={name}: compiling for TPU needs libtpu; install it with "
                    f"pip install 'jax[tpu]=={jax.__version__}'")
  from jax.experimental import topologies
  # deviceless: another process compiling for TPU (a plan, a test worker) must not lock us out
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  dims = tuple(int(d) for d in name.split(":")[1].split("x"))
  try:
    try:
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:
      if "chips_per_host_bounds" not in str(e) or max(dims) > 2:
        raise
      # a slice smaller than a host's 2x2 chip grid (e.g. v5e:1x1): one host holds all of it
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                          chips_per_host_bounds=dims + (1,) * (3 - len(dims)))
  except Exception as e:   # libtpu's own message names the reason
    raise PlanError(f"--topology={name}: libtpu refused it ({str(e).splitlines()[0]})") from None
  return CHIPS[name.split(":")[0]], list(desc.devices)


def _shape_model(make, mesh, rules):
  """(graphdef, abstract state) of ``make()`` placed per ``rules`` (no parameter is created)."""
  return sharding.abstract_model(make, mesh, rules)


def _reward(cfg, mesh):
  """The run's reward as shapes: the loader's model, dtypes and placement (the run's rules)."""
  from didr_jax.models.clip import CLIPModel
  from didr_jax.models.clip_loading import hf_clip_config, openclip_config
  from didr_jax.models.diffusers_loading import ShapeOnlyRngs
  from didr_jax.pipelines import tiny
  from didr_jax.pipelines.conditioning import HashTokenizer
  from didr_jax.rewards.clip_rewards import AestheticHead, clip_reward
  name = cfg.reward.name
  configs = {"tiny_pickscore": tiny.reward_config, "pickscore": lambda: hf_clip_config(model_configs.load("pickscore_clip")),
             "hpsv2": lambda: openclip_config("ViT-H-14"), "hpsv2.1": lambda: openclip_config("ViT-H-14"),
             "clipscore": lambda: openclip_config("ViT-L-14-quickgelu"),
             "aesthetic": lambda: openclip_config(cfg.reward.clip_config or "ViT-L-14-quickgelu")}
  if name not in configs:
    raise PlanError(f"config.reward.name: {name!r} has no shape-only model in the plan; choose one of "
                    f"{sorted(configs)}")
  ccfg = configs[name]()
  rules = sharding.get_rules(cfg.mesh.rules)
  graph, state = _shape_model(lambda: CLIPModel(ccfg, rngs=ShapeOnlyRngs()), mesh, rules)
  with sharding.model_context(mesh, rules):
    clip = nnx.merge(graph, state)
    head = None
    if name == "aesthetic":
      hg, hs = _shape_model(lambda: AestheticHead(ccfg.projection_dim, rngs=ShapeOnlyRngs()), mesh, rules)
      head = nnx.merge(hg, hs)
  # token ids are inputs of the step (shapes only): the tokenizer is never called
  tok = HashTokenizer(ccfg.text.vocab_size, ccfg.text.max_positions)
  return clip_reward(name, clip, head=head, tokenizer=None if name == "aesthetic" else tok)


# the shipped full-size configs of each backbone: (network, VAE); PixArt-alpha's VAE is SD's
FULL_SIZE = {"sdxl": ("sdxl_unet", "sdxl_vae"), "sd15": ("sd15_unet", "sd15_vae"),
             "pixart": ("pixart_transformer", "sd15_vae"), "zimage": ("zimage_transformer", "zimage_vae")}


def _text_rows(backbone, net_cfg, variant: str, dtype) -> dict:
  """{key: (shape per prompt, dtype)} of the text rows the backbone's network reads (the text
  towers run before the step, or once with ``data.precompute_embeddings``: not compiled here)."""
  from didr_jax.pipelines import tiny
  from didr_jax.text.qwen3_tokenize import QWEN3_MAX_LENGTH
  from didr_jax.text.t5_tokenize import PIXART_MAX_LENGTH
  name = backbone.name
  if name in ("sdxl", "sd15"):
    rows = {"context": ((tiny.TOKENS if variant == "tiny" else 77, net_cfg.cross_attention_dim), dtype)}
    if name == "sdxl":
      pooled = net_cfg.projection_class_embeddings_input_dim - 6 * net_cfg.addition_time_embed_dim
      rows.update(pooled=((pooled,), jnp.float32), time_ids=((6,), jnp.float32))
    return rows
  length = tiny.TOKENS if variant == "tiny" else {"pixart": PIXART_MAX_LENGTH, "zimage": QWEN3_MAX_LENGTH}[name]
  width = net_cfg.caption_channels if name == "pixart" else net_cfg.cap_feat_dim
  rows = {"context": ((length, width), dtype), "mask": ((length,), jnp.bool_)}
  if name == "pixart":
    rows.update(resolution=((2,), jnp.float32), aspect_ratio=((1,), jnp.float32))
  return rows


def _empty_rows(backbone, rows: dict):
  """The unconditional text rows as the run holds them (values do not change the program): None
  where CFG zeroes the rows (SDXL), else the empty prompt's context and (T5 / Qwen3) its mask."""
  from didr_jax.pipelines.conditioning import TEXT
  if TEXT[backbone.text].uncond == "zeros":
    return None
  empty = {"context": jnp.zeros(*rows["context"])}
  if "mask" in rows:
    empty["mask"] = jnp.arange(rows["mask"][0][0]) < 1
  return empty


def abstract_parts(cfg, mesh, rules) -> dict:
  """The models ``T2I`` needs, as shapes: full-size from the shipped configs (``:tiny``: the tiny
  ones), placed with the run's mesh and rules; plus the cond rows' shapes (``cond_rows``)."""
  from didr_jax.models.diffusers_loading import KINDS, abstract_for
  from didr_jax.models.vae import VAEConfig
  from didr_jax.pipelines import backbones, tiny
  m, b = cfg.model, backbones.get(cfg.backbone)
  if cfg.variant == "tiny":
    ncfg, vcfg = tiny.network_config(b.name, cfg.tiny.width), tiny.vae_config(b.name, cfg.tiny.vae_width)
  else:
    net_name, vae_name = FULL_SIZE[b.name]
    ncfg = KINDS[b.network_class].config_cls.from_dict(model_configs.load(net_name))
    vcfg = VAEConfig.from_dict(model_configs.load(vae_name))
  kw = dict(param_dtype=DTYPES[m.param_dtype], attention=m.attention, remat=m.remat, mesh=mesh, rules=rules)
  net_graph, ref = abstract_for(b.network_class, ncfg, dtype=DTYPES[m.dtype], **kw)
  vae_graph, vae = abstract_for("AutoencoderKL", vcfg, dtype=DTYPES[m.vae_dtype], **kw)
  reward = _reward(cfg, mesh)
  rows = _text_rows(b, ncfg, cfg.variant, DTYPES[m.dtype])
  empty = _empty_rows(b, rows)
  if reward.tokenizer is not None:
    rows["reward_ids"] = ((reward.tokenizer.max_length,), jnp.int32)
  return dict(net_graph=net_graph, ref=ref, vae_graph=vae_graph, vae=vae, vae_config=vcfg, towers=[],
              reward=reward, gen=None, empty=empty, cond_rows=rows)


def abstract_conds(pipe, rows: dict, lead: tuple[int, ...]) -> dict:
  """Cond ShapeDtypeStructs [*lead, B, ...] sharded as ``T2I.conds`` places them."""
  b = pipe.cfg.align.batch
  return {k: jax.ShapeDtypeStruct(lead + (b,) + shape, dtype,
                                  sharding=pipe.cond_sharding(len(lead) + 1 + len(shape), len(lead)))
          for k, (shape, dtype) in rows.items()}


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _measure(lowered, chip: Chip, num_devices: int, compile_s_from: float, state, args) -> dict:
  """Per-device memory and cost of the program compiled under the chip's HBM. A program XLA
  cannot fit there has no compiled program to ask (libtpu's no-crash-on-OOM option crashes on
  full-size steps): its temporaries are the figure of XLA's message, its arguments and outputs the
  unpadded bytes of the input / donated-state shards, its FLOPs those of the lowered program, its
  bytes accessed unknown (None)."""
  limit = {"xla_tpu_max_hbm_size_mib": str(chip.hbm_bytes // 2 ** 20)}
  flops = program_flops(lowered.as_text(dialect="hlo")) / num_devices
  try:
    compiled, oom = lowered.compile(compiler_options=limit), None
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, oom = None, str(e).strip().splitlines()[0]
  out = {"compile_s": round(time.time() - compile_s_from, 1), "oom": oom}
  if compiled is not None:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
               alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
               code_bytes=int(mem.generated_code_size_in_bytes), flops=flops,
               xla_cost_flops=float(cost.get("flops", 0.0)),
               bytes_accessed=float(cost.get("bytes accessed", 0.0)), source="compiled")
  else:
    need = OOM_TEMPORARIES.search(oom)
    state_bytes = _per_device_bytes(state)
    out.update(argument_bytes=_per_device_bytes(args), output_bytes=state_bytes, alias_bytes=state_bytes,
               temp_bytes=int(float(need.group(1)) * 1024 ** "KMGT".index(need.group(2)) * 1024) if need else 0,
               code_bytes=0, flops=flops, xla_cost_flops=None, bytes_accessed=None,
               source="xla_oom_message+shards")
  # donated inputs alias outputs: counted once
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def _roofline(entry: dict, chip: Chip, hbm_margin: float):
  entry["fits"] = entry["oom"] is None and entry["total_bytes"] <= (1.0 - hbm_margin) * chip.hbm_bytes
  if entry["bytes_accessed"] is None:   # not compiled: no program to time
    entry["est_step_s"] = entry["mfu_ceiling"] = None
    return
  t_flops = entry["flops"] / chip.peak_bf16_flops
  t_bytes = entry["bytes_accessed"] / chip.hbm_bytes_per_s
  entry["est_step_s"] = max(t_flops, t_bytes)
  entry["mfu_ceiling"] = t_flops / entry["est_step_s"] if entry["est_step_s"] > 0 else 0.0


def plan(cfg, topology: str, *, hbm_margin: float = 0.1, steps=("ta", "generator", "outer"), log=print) -> dict:
  """Compile the run's steps for ``topology``; the plan.json dict (bytes and FLOPs per device)."""
  from didr_jax.models.lora import LoraError
  from didr_jax.pipelines import validate
  from didr_jax.pipelines.experiment import abstract_state, build_training, objective_config
  from didr_jax.pipelines.t2i import T2I
  from didr_jax.training.steps import lower_chunk, scan_chunk
  chip, devices = topology_devices(topology)
  validate.validate(cfg, num_devices=len(devices), check_inputs=False)
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
  parts = abstract_parts(cfg, mesh, sharding.get_rules(cfg.mesh.rules))
  try:
    pipe = T2I(cfg, devices=devices, parts=parts)   # LoRA targets checked against the shipped config
  except LoraError as e:
    raise ConfigError(f"config.{e}") from None
  training = build_training(pipe, cfg)
  frozen = pipe.frozen()
  if objective_config(cfg).needs_drs_table:
    repl = NamedSharding(pipe.mesh, P())
    frozen["drs_table"] = {k: jax.ShapeDtypeStruct((64,), jnp.float32, sharding=repl) for k in ("t", "v")}
  state = abstract_state(pipe, cfg, training["gen_tx"], training["ta_tx"])
  rows, k, n = parts["cond_rows"], cfg.align.k_ta, cfg.train.steps_per_chunk
  one = abstract_conds(pipe, rows, ())
  if cfg.align.fresh_ta_prompts:
    chunk_conds = {"gen": abstract_conds(pipe, rows, (n,)), "ta": abstract_conds(pipe, rows, (n, k))}
  else:
    chunk_conds = abstract_conds(pipe, rows, (n,))
  programs = {"ta": (training["ta_update"], one), "generator": (training["gen_update"], one),
              "outer": (scan_chunk(training["outer"], n), chunk_conds)}
  result = {"topology": topology, "num_devices": len(devices), "device_kind": devices[0].device_kind,
            "hbm_bytes": chip.hbm_bytes, "mesh": dict(pipe.mesh.shape), "hbm_margin": hbm_margin,
            "chip": dataclasses.asdict(chip), "steps": {}}
  for name in steps:
    fn, conds = programs[name]
    t0 = time.time()
    lowered = lower_chunk(fn, state, frozen, conds, pipe.mesh)
    lower_s = time.time() - t0
    with jax.set_mesh(pipe.mesh):
      entry = _measure(lowered, chip, len(devices), t0, state, (state, frozen, conds))
    entry["lower_s"] = round(lower_s, 1)
    result["steps"][name] = entry
    log(f"compiled {name} for {topology} in {entry['compile_s']:.0f}s")
  s = result["steps"]
  if "ta" in s and "generator" in s:   # per outer step, from the single-update programs
    both = lambda key: (None if None in (s["generator"][key], s["ta"][key])
                        else s["generator"][key] + k * s["ta"][key])
    s["per_outer_step"] = {"flops": both("flops"), "bytes_accessed": both("bytes_accessed")}
  for name, entry in s.items():
    if name != "per_outer_step":
      _roofline(entry, chip, hbm_margin)
  return result


def table(result: dict) -> str:
  """A plain-text table of a plan (per device)."""
  lines = [f"{result['topology']}: {result['num_devices']} x {result['device_kind']}, "
           f"{result['hbm_bytes'] / GiB:.0f} GiB HBM each, mesh {result['mesh']}",
           f"{'step':<10}{'args GiB':>9}{'temp GiB':>9}{'total GiB':>10}{'fits':>6}{'TFLOP':>9}"
           f"{'est s':>8}{'MFU ceil':>9}{'compile s':>10}"]
  for name, e in result["steps"].items():
    if name == "per_outer_step":
      continue
    timed = e["est_step_s"] is not None
    lines.append(f"{name:<10}{e['argument_bytes'] / GiB:>9.2f}{e['temp_bytes'] / GiB:>9.2f}"
                 f"{e['total_bytes'] / GiB:>10.2f}{'yes' if e['fits'] else 'NO':>6}{e['flops'] / 1e12:>9.2f}"
                 + (f"{e['est_step_s']:>8.3f}{e['mfu_ceiling']:>9.2f}" if timed else f"{'-':>8}{'-':>9}")
                 + f"{e['compile_s']:>10.0f}")
    if e["oom"]:
      lines.append(f"  {name}: {e['oom']}")
  return "\n".join(lines)
