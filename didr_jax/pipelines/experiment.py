"""The text-to-image alignment run: build, restore or init, AOT-compile, train, evaluate, export.

Outputs in the workdir: config.json, metrics.jsonl, tb/, grid_<step>.png (fixed prompts and seeds),
checkpoints/ (full TrainState; the data position is the step), export/<unet|transformer>[_ema]
(diffusers).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
from flax import nnx

from didr_jax import log, sharding
from didr_jax.data import PromptSampler, load_prompts
from didr_jax.models import lora
from didr_jax.models.diffusers_loading import to_diffusers
from didr_jax.objectives import ObjectiveConfig
from didr_jax.objectives.generator import RATIO_PREFIX
from didr_jax.pipelines.t2i import T2I
from didr_jax.training import state as st
from didr_jax.training.checkpoint import Checkpointer
from didr_jax.training.drs_table import persisted_variance_table
from didr_jax.training.loop import NonFiniteError, StopSignal, run_chunks
from didr_jax.training.metrics import MetricWriter
from didr_jax.training.steps import StepConfig, compile_chunk, make_outer_step, scan_chunk

# Checked in this order when a run stops on non-finite updates: the first one found is named.
NONFINITE_ORDER = ("reward", "drp_reward", "snis_ess", "gen_loss", "kl_grad_norm", "pseudo_huber", "gen_grad_norm",
                   "ta_loss", "ta_grad_norm")


def objective_config(cfg) -> ObjectiveConfig:
  return ObjectiveConfig.from_group(cfg.objective, method=cfg.method)


def prompts_of(cfg) -> list[str]:
  if cfg.variant == "tiny" and not cfg.data.prompts:
    return list(cfg.tiny.prompts)
  return load_prompts(cfg.data.prompts, format=cfg.data.format, field=cfg.data.field)


# How a run executes, not what it computes: a resume may change them.
EXECUTION_FIELDS = {"model": ("attention", "remat", "cache_dir"), "data": ("precompute_embeddings",),
                    "align": ("steps", "grad_accum")}
# Where inputs live: replaced by a fingerprint of their content, so a moved folder still resumes.
PATH_FIELDS = {"model": ("reference", "generator"), "reward": ("path", "clip", "tokenizer"),
               "data": ("prompts",)}


def content_fingerprint(path: str) -> str:
  """sha1 of what a file or folder holds, independent of where it is: every file's relative name
  and size, the full text of its JSON/text configs, and the first and last MiB of the others
  (weights are not read in full). "" for an unset path."""
  if not path:
    return ""
  h = hashlib.sha1()
  files = ([(os.path.basename(path), path)] if os.path.isfile(path) else
           sorted((os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
                  for d, _, names in os.walk(path) for f in names))
  for rel, full in files:
    size = os.path.getsize(full)
    h.update(f"{rel}\0{size}\0".encode())
    with open(full, "rb") as f:
      if rel.endswith((".json", ".txt")) or size <= 2 << 20:
        h.update(f.read())
      else:
        h.update(f.read(1 << 20))
        f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read())
  return h.hexdigest()


def identity(cfg, sampler) -> dict:
  """What the checkpoint depends on: the mathematics of the run. Execution details (mesh, remat,
  attention kernel, caches, step count) are left out and input paths enter by content."""
  d = cfg.to_dict()
  for k in ("train", "checkpoint", "eval", "mesh"):   # may change between runs (restore re-shards)
    d.pop(k)
  for group, keys in EXECUTION_FIELDS.items():
    d[group] = {k: v for k, v in d[group].items() if k not in keys}
  for group, keys in PATH_FIELDS.items():
    d[group] = {k: (content_fingerprint(v) if k in keys else v) for k, v in d[group].items()}
  d["data_fingerprint"] = sampler.fingerprint
  return d


def batch_arithmetic(cfg, mesh) -> str:
  b = cfg.align.batch
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  m = cfg.align.grad_accum
  return (f"batch: global {b}, per host {b // jax.process_count()} ({jax.process_count()} hosts), "
          f"per device {b // data_ways} (data x fsdp = {data_ways}), {m} microbatch(es) of "
          f"{b // data_ways // m} per device; mesh {dict(mesh.shape)}")


def build_training(pipe: T2I, cfg) -> dict:
  """The step functions of the config's method (outer, ta_warmup, ta_update, gen_update) and the
  two optimizers (gen_tx, ta_tx)."""
  gen_tx, ta_tx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  # DI / DIDR decode and score the training batch only on each chunk's last step: the reward is
  # only logged there, and the VAE decode + reward model is a large part of a generator step.
  step_cfg = StepConfig(batch_size=cfg.align.batch, k_ta=cfg.align.k_ta, ema_decay=cfg.align.ema_decay,
                        grad_accum=cfg.align.grad_accum,
                        reward_metrics_every=cfg.train.steps_per_chunk,
                        fresh_ta_conds=cfg.align.fresh_ta_prompts)
  steps = make_outer_step(pipe.task, objective_config(cfg), step_cfg, gen_tx, ta_tx,
                          batch_sharding=pipe.batch_sh)
  return dict(steps._asdict(), gen_tx=gen_tx, ta_tx=ta_tx)


def init_state(pipe: T2I, cfg, gen_tx, ta_tx):
  gen, ta = pipe.initial_trainables()
  with sharding.model_context(pipe.mesh, pipe.rules):
    return st.init_train_state(gen_params=gen, ta_params=ta, gen_tx=gen_tx, ta_tx=ta_tx,
                               ema=cfg.align.ema_decay > 0, seed=cfg.seed + 7, mesh=pipe.mesh)


def abstract_state(pipe: T2I, cfg, gen_tx, ta_tx):
  """The TrainState of the run as shapes with shardings, nothing allocated."""
  gen, ta = pipe.abstract_trainables()
  return st.abstract_train_state(gen_params=gen, ta_params=ta, gen_tx=gen_tx, ta_tx=ta_tx,
                                 ema=cfg.align.ema_decay > 0, mesh=pipe.mesh)


def restore_or_init_state(pipe: T2I, cfg, gen_tx, ta_tx, ckpt: Checkpointer):
  """The latest checkpoint restored onto the state's abstract shapes and shardings, or (without
  one) a fresh state: never both alive at once."""
  if ckpt.latest_step() is None:
    return init_state(pipe, cfg, gen_tx, ta_tx)
  return ckpt.restore(abstract_state(pipe, cfg, gen_tx, ta_tx))


def check_finite(metrics, max_bad: int, step: int):
  """NonFiniteError naming the first non-finite quantity of a chunk's ``metrics`` when its last
  step left ``max_bad`` or more skipped generator updates in a row (``bad_steps``)."""
  if max_bad <= 0 or "bad_steps" not in metrics:
    return
  host = {k.removeprefix(RATIO_PREFIX): np.asarray(sharding.to_host(v)) for k, v in metrics.items()}
  bad = int(host["bad_steps"].reshape(-1)[-1])
  if bad < max_bad:
    return
  names = [k for k in NONFINITE_ORDER if k in host] + sorted(k for k in host if k not in NONFINITE_ORDER)
  first = next((k for k in names if not np.all(np.isfinite(host[k]))), "gradients")
  raise NonFiniteError(f"{bad} consecutive non-finite generator updates at step {step}: first "
                       f"non-finite quantity {first!r}; the last good checkpoint is kept")


def write_grid(path: str, images: np.ndarray, cols: int = 4):
  from PIL import Image
  n, h, w, _ = images.shape
  rows = -(-n // cols)
  grid = np.zeros((rows * h, cols * w, 3), np.uint8)
  px = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = px[i]
  Image.fromarray(grid).save(path)
  return grid


def export_networks(net_graph, trees: dict, folder: str, dtype=np.float32) -> list[str]:
  """{name: network params} -> diffusers folders ``folder/<name>``. Every process gathers the params;
  process 0 writes each folder under ``<name>.partial`` and renames it when complete, so a crash
  never leaves a half-written export in place."""
  out = []
  for name, params in trees.items():
    model = nnx.merge(net_graph, jax.tree.map(sharding.to_host, params))
    if jax.process_index() == 0:
      out.append(_replace_atomically(os.path.join(folder, name),
                                     lambda d: to_diffusers(model, d, dtype=dtype)))
  return out


def _replace_atomically(final: str, write) -> str:
  """``write(partial)`` into ``final + ".partial"``, then rename it onto ``final`` (process 0)."""
  partial = final + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  write(partial)
  shutil.rmtree(final, ignore_errors=True)
  os.replace(partial, final)
  return final


def export_generator(net_graph, trees: dict, folder: str, *, lora_run=None, base=None,
                     with_base: bool = False, dtype=np.float32) -> list[str]:
  """{name: the state's generator tree} -> diffusers folders ``folder/<name>``. Under LoRA the trees
  are adapters: ``<name>`` holds the merged network, ``<name>_lora`` the adapters in the PEFT
  format diffusers' LoRA loaders read, and with ``with_base`` (a base that exists only in memory,
  the ``:tiny`` runs) ``<network>_base`` the base they apply to."""
  if lora_run is None:
    return export_networks(net_graph, trees, folder, dtype)
  merge = jax.jit(lora_run.merged)
  out = export_networks(net_graph, {n: merge(base, a) for n, a in trees.items()}, folder, dtype)
  for name, adapters in trees.items():
    host = jax.tree.map(sharding.to_host, adapters)
    if jax.process_index() == 0:
      out.append(_replace_atomically(os.path.join(folder, f"{name}_lora"), lambda d: lora.save_peft(
          d, host, lora_run.targets, lora_run.scale, prefix=lora_run.prefix)))
  if with_base:
    out += export_networks(net_graph, {f"{lora_run.prefix}_base": base}, folder, dtype)
  return out


def export(pipe: T2I, state, workdir: str, with_ema: bool) -> list[str]:
  """Generator (and EMA) networks as diffusers folders under workdir/export/ (``unet`` or
  ``transformer``, as the backbone's pipeline names its denoiser; ``_ema`` for the EMA; LoRA: see
  :func:`export_generator`)."""
  name = pipe.backbone.network_folder
  trees = {name: state.gen_params}
  if with_ema and state.gen_ema is not None:
    trees[f"{name}_ema"] = state.gen_ema
  adapted = pipe.lora is not None and pipe.lora.adapts("gen")
  return export_generator(pipe.net_graph, trees, os.path.join(workdir, "export"),
                          lora_run=pipe.lora if adapted else None, base=pipe.gen_init,
                          with_base=adapted and pipe.cfg.variant == "tiny")


def run(cfg, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  prompts = prompts_of(cfg)
  sampler = PromptSampler(prompts, global_batch=cfg.align.batch, seed=cfg.seed, shuffle=cfg.data.shuffle)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), identity=identity(cfg, sampler),
                      max_to_keep=cfg.checkpoint.keep, save_every=cfg.checkpoint.every_steps,
                      async_save=cfg.checkpoint.async_save)
  ckpt.check_identity()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  pipe = T2I(cfg)
  log.info("%s", batch_arithmetic(cfg, pipe.mesh))
  writer = MetricWriter(workdir)
  parts = build_training(pipe, cfg)
  frozen = pipe.frozen()
  if objective_config(cfg).needs_drs_table:
    frozen["drs_table"] = persisted_variance_table(os.path.join(workdir, "drs_table.json"),
                                                   lambda: pipe.variance_table(sampler), pipe.mesh)
  n = cfg.train.steps_per_chunk
  eval_fn = pipe.eval_fn()
  eval_cond, eval_z = pipe.eval_inputs(cfg.eval.prompts, cfg.eval.seed)
  result = {}

  def evaluate(step, state):
    """Held-out reward and grid of the generator and, when kept, of its EMA (the export's twin)."""
    for prefix, params, grid_name in (("eval", state.gen_params, f"grid_{step:06d}.png"),
                                      ("eval_ema", state.gen_ema, f"grid_ema_{step:06d}.png")):
      if params is None:
        continue
      images, rewards = eval_fn(params, frozen, eval_cond, eval_z)
      images, rewards = sharding.to_host(images), sharding.to_host(rewards)
      writer.write(step, {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())},
                   prefix=f"{prefix}/")
      if jax.process_index() == 0:
        grid = write_grid(os.path.join(workdir, grid_name), images)
        writer.write_image(step, f"{prefix}/grid", grid)
      result[f"{prefix}_reward_mean"] = float(rewards.mean())

  with StopSignal() as stop:
    state = restore_or_init_state(pipe, cfg, parts["gen_tx"], parts["ta_tx"], ckpt)
    chunks, clock = [0], [time.time()]

    def on_chunk(step, st_):
      chunks[0] += 1
      if chunks[0] % cfg.eval.every_chunks == 0 and step < cfg.align.steps:
        evaluate(step, st_)

    def on_settled(step, metrics, host):
      check_finite(metrics, cfg.align.max_bad_steps, step)
      now = time.time()
      if host is not None:   # wall time per outer step between settled chunks
        dt = (now - clock[0]) / n
        writer.write(step, {"step_time_s": dt, "images_per_s": cfg.align.batch / dt}, prefix="perf/")
      clock[0] = now

    warmup = cfg.align.ta_warmup_steps
    phases = [("ta_warmup", warmup, f"align/{cfg.method}/ta_warmup"),
              ("outer", cfg.align.steps, f"align/{cfg.method}")]
    for which, until, what in phases:
      start = int(sharding.to_host(state.step))
      if start >= until:
        continue
      if which == "ta_warmup":
        log.info("TA warm-up: steps %d..%d run %d TA updates each, the generator is frozen",
                 start + 1, until, cfg.align.k_ta)
      chunk = compile_chunk(scan_chunk(parts[which], n), state, frozen, pipe.conds(sampler, start, n),
                            pipe.mesh, what)
      try:
        state = run_chunks(name=cfg.method, state=state, frozen=frozen, chunk=chunk,
                           steps_per_chunk=n, num_steps=until,
                           conds_for=lambda s: pipe.conds(sampler, s, n), checkpointer=ckpt,
                           writer=writer, stop=stop, log_every_chunks=cfg.train.log_every_chunks,
                           on_chunk=on_chunk, on_settled=on_settled)
      except NonFiniteError:
        ckpt.close()           # let pending async saves of the last good state finish
        raise
    end = int(sharding.to_host(state.step))
    evaluate(end, state)
    result["export"] = export(pipe, state, workdir, cfg.eval.export_ema)
  ckpt.close()
  writer.close()
  result["step"] = end
  log.info("finished at step %d; exported %s", end, result["export"])
  return result
