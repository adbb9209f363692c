"""Sample a t2i model to PNG files: a run's one-step generator, an exported or third-party one, or
the multi-step reference (the "teacher" column of the papers' tables).

Seed rule (pinned): the latent noise of prompt index ``i`` and seed ``s`` is
``jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(s), i), (h, w, c))`` in float32 (c the
backbone's latent channels), a
function of the pair alone, so the images do not depend on the batch, the device count or which
files already exist. ``--images_per_prompt=N`` means seeds 0..N-1.

Outputs in ``out``: ``{i:05d}_{s}.png`` (uint8, ``round((x + 1) * 127.5)``), ``index.jsonl`` (one
row per image, prompt-major, written when all exist) and ``sample.json`` (what made the images:
a folder holding another model's or setting's images is refused, so a resumed run never mixes
them). Every process computes its share of each global batch; process 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didr_jax import log, sharding
from didr_jax.diffusion import ddim_sample
from didr_jax.errors import ConfigError
from didr_jax.models.layers import DTYPES
from didr_jax.pipelines import backbones, t2i
from didr_jax.pipelines.conditioning import PromptEncoder
from didr_jax.training.task import Task

NOISE_RULE = "normal(fold_in(PRNGKey(seed), prompt_index), (h, w, c)), float32"
NUM_TRAIN_TIMESTEPS = 1000


class SampleError(ConfigError):
  """Sampling inputs that do not fit together (flags, the output folder, the run)."""


@dataclasses.dataclass(frozen=True)
class Item:
  prompt_index: int
  seed: int

  @property
  def file(self) -> str:
    return f"{self.prompt_index:05d}_{self.seed}.png"


def plan(num_prompts: int, seeds: Sequence[int]) -> list[Item]:
  """Every (prompt, seed) pair, prompt-major."""
  return [Item(i, int(s)) for i in range(num_prompts) for s in seeds]


def teacher_timesteps(steps: int, flow: bool = False) -> np.ndarray:
  """VP: diffusers' "leading" spacing with steps_offset 1 (the SD / SDXL scheduler configs),
  t_j = j * (1000 // steps) + 1, decreasing. Flow: FlowMatchEulerDiscreteScheduler's
  t = linspace(1, 1/steps, steps) (the schedule applies the time shift); the last D is x0, which
  is its final Euler step to sigma = 0."""
  if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
    raise SampleError(f"--teacher_steps={steps}: expected 1..{NUM_TRAIN_TIMESTEPS}")
  if flow:
    return np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
  return (np.arange(steps) * (NUM_TRAIN_TIMESTEPS // steps) + 1)[::-1].astype(np.float32)


def noise(prompt_index, seed, shape):
  """The pinned seed rule for a batch of (prompt index, seed) pairs."""
  one = lambda i, s: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(s), i), shape, jnp.float32)
  return jax.vmap(one)(prompt_index, seed)


def to_uint8(images):
  """[-1, 1] float images -> uint8, round half up (as the training grids)."""
  return jnp.floor(jnp.clip((images + 1.0) * 127.5 + 0.5, 0.0, 255.0)).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Source:
  """What to sample: a run's checkpoint (``workdir``), a generator folder or file with a config
  (``generator``), and/or the reference with ``teacher_steps`` DDIM steps."""
  workdir: str | None = None
  step: int | None = None
  ema: bool = False
  generator: str | None = None
  teacher_steps: int = 0
  guidance_scale: float | None = None


def guidance_scale(cfg, src: Source) -> float:
  g = (src.guidance_scale if src.guidance_scale is not None else
       backbones.get(cfg.backbone).defaults["sample_guidance"])
  return float(g)


def check_source(src: Source, cfg) -> dict:
  """Flag combinations and paths, before anything is built; returns the identity of the images
  (the model, its step, the settings that change pixels) that ``sample.json`` records."""
  if src.step is not None and src.workdir is None:
    raise SampleError("--step: only with --workdir (a training run's checkpoint)")
  if src.teacher_steps:
    teacher_timesteps(src.teacher_steps)
    if src.ema or src.step is not None or src.generator:
      raise SampleError("--teacher_steps samples the reference: it takes no --ema, --step or --generator")
  elif src.guidance_scale is not None:
    raise SampleError("--guidance_scale: only with --teacher_steps (one-step generators take none)")
  if src.ema and cfg.align.ema_decay <= 0:
    raise SampleError(f"--ema: the run {src.workdir} keeps no EMA (align.ema_decay = {cfg.align.ema_decay})")
  if src.workdir is None and not src.teacher_steps and not src.generator:
    raise SampleError("--generator: give a diffusers network folder or .safetensors file (or --workdir, "
                      "or --teacher_steps)")
  if src.generator and src.workdir is not None:
    raise SampleError("--generator: not with --workdir (which samples the run's own generator)")
  if src.generator and not os.path.exists(src.generator):
    raise SampleError(f"--generator={src.generator}: not found")
  if cfg.variant != "tiny":
    from didr_jax.pipelines.validate import check_model_paths
    check_model_paths(cfg)
  step = None
  if src.teacher_steps:
    model = (f"tiny reference (seed {cfg.seed})" if cfg.variant == "tiny" else
             os.path.abspath(os.path.join(cfg.model.reference, backbones.get(cfg.backbone).network_folder)))
  elif src.workdir is not None:
    from didr_jax.training.checkpoint import available_steps
    steps = available_steps(os.path.join(src.workdir, "checkpoints"))
    if src.step is not None and src.step not in steps:
      raise SampleError(f"--step={src.step}: {src.workdir} has checkpoints of steps {steps}")
    step = max(steps) if src.step is None else src.step
    model = f"{os.path.abspath(src.workdir)}/checkpoints/{step}/{'gen_ema' if src.ema else 'gen_params'}"
  else:
    model = os.path.abspath(src.generator)
  return {"model": model, "step": step, "backbone": cfg.backbone, "resolution": cfg.data.resolution,
          "teacher_steps": src.teacher_steps,
          "guidance_scale": guidance_scale(cfg, src) if src.teacher_steps else None,
          "label_t": None if src.teacher_steps else float(cfg.model.label_t),
          "input_scale": None if src.teacher_steps else float(cfg.model.input_scale), "noise": NOISE_RULE}


def check_batch(batch: int) -> None:
  if batch < 1 or batch % jax.device_count():
    raise SampleError(f"--batch={batch}: expected a positive multiple of the device count "
                      f"{jax.device_count()}")


class Sampler:
  """The models of one source on a mesh of all devices (FSDP params, data-parallel batches);
  ``src`` as passed by :func:`check_source`."""

  def __init__(self, cfg, src: Source, batch: int):
    self.cfg, self.src = cfg, src
    devices = jax.devices()
    check_batch(batch)
    self.batch = batch
    self.mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    self.rules = sharding.get_rules(cfg.mesh.rules)
    local = [d for d in devices if d.process_index == jax.process_index()]
    text_mesh = sharding.make_mesh((1, 1, 1), devices=local[:1])
    m, b = cfg.model, backbones.get(cfg.backbone)
    if cfg.variant == "tiny":
      from didr_jax.pipelines import tiny
      parts = tiny.build(cfg.backbone, seed=cfg.seed, mesh=self.mesh, rules=self.rules,
                         dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                         vae_dtype=DTYPES[m.vae_dtype], text_mesh=text_mesh,
                         width=cfg.tiny.width, vae_width=cfg.tiny.vae_width)
    else:
      parts = t2i.load_vae_and_towers(cfg, self.mesh, self.rules, text_mesh)
    self.vae_graph, self.vae = parts["vae_graph"], parts["vae"]
    self.latent = cfg.data.resolution // t2i.vae_factor(parts["vae_config"])
    self.encoder = PromptEncoder(cfg.backbone, parts["towers"], None, resolution=cfg.data.resolution,
                                 dtype=DTYPES[m.dtype], block=batch // jax.process_count())
    self.schedule = b.make_schedule(cfg)
    self.graph, self.params = self._network(parts)
    apply = backbones.network_apply(b, self.graph, self.schedule)
    shape = (self.latent, self.latent, b.latent_channels)
    if src.teacher_steps:
      self.guidance_scale = guidance_scale(cfg, src)
      task = Task(schedule=self.schedule, prediction=b.prediction, sample_shape=shape, generator_apply=None,
                  network_apply=apply, reward_apply=None, ta_t_range=(), gen_t_range=(),
                  uncond=self.encoder.uncond)
      ts = jnp.asarray(teacher_timesteps(src.teacher_steps, b.flow))

      def latents(params, z, cond):   # the pipeline's guidance g as our augmented w
        denoise = task.denoiser(params, self.guidance_scale - b.guidance_offset)
        return ddim_sample(lambda x, t, c: denoise(x, t, c, True), z, ts, self.schedule, cond)
    else:
      latents = t2i.one_step_x0(apply, self.schedule, b.prediction, float(m.label_t), float(m.input_scale))

    def images(params, vae, cond, prompt_index, seed):
      z = jax.lax.with_sharding_constraint(noise(prompt_index, seed, shape), self.batch_sh)
      return to_uint8(t2i.decode(self.vae_graph, vae, latents(params, z, cond)))

    self.batch_sh = sharding.batch_sharding(self.mesh, 4)
    self._images = jax.jit(images, out_shardings=self.batch_sh)

  def _network(self, parts):
    """(graph, params) of the network to sample."""
    cfg, src, m = self.cfg, self.src, self.cfg.model
    b = backbones.get(cfg.backbone)
    kw = dict(t2i.model_kwargs(cfg, self.mesh, self.rules), attention="xla", remat="none", cache_dir=None)
    if src.teacher_steps:
      if cfg.variant == "tiny":
        return parts["net_graph"], parts["ref"]
      from didr_jax.models.diffusers_loading import from_diffusers
      return nnx.split(from_diffusers(os.path.join(m.reference, b.network_folder), **kw))
    from didr_jax.pipelines.export_checkpoint import generator_config, restore_generators
    if src.workdir is not None:
      field = "gen_ema" if src.ema else "gen_params"
      _, graph, trees, lora = restore_generators(cfg, src.workdir, [field], src.step, self.mesh)
      if lora is None:
        return graph, trees[field]
      run, base = lora
      return graph, jax.jit(run.merged)(base, trees[field])
    return t2i.load_generator(src.generator, b.network_class, generator_config(cfg), kw)

  def batch_images(self, prompts: Sequence[str], items: Sequence[Item]) -> np.ndarray:
    """uint8 [batch, H, W, 3] of one global batch of items (every process passes all of them)."""
    n, p = len(items), jax.process_count()
    local = slice(jax.process_index() * n // p, (jax.process_index() + 1) * n // p)
    rows = self.encoder.encode([prompts[it.prompt_index] for it in items[local]])
    rows["prompt_index"] = np.asarray([it.prompt_index for it in items[local]], np.int32)
    rows["seed"] = np.asarray([it.seed for it in items[local]], np.uint32)
    put = lambda v: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
    arrays = {k: put(v) for k, v in rows.items()}
    index, seed = arrays.pop("prompt_index"), arrays.pop("seed")
    with sharding.model_context(self.mesh, self.rules):
      out = self._images(self.params, self.vae, arrays, index, seed)
    return sharding.to_host(out)


def _write_png(path: str, image: np.ndarray):
  from PIL import Image
  tmp = path + ".partial.png"
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def pending_items(out: str, items: Sequence[Item]) -> list[Item]:
  """Items whose file process 0 does not see yet; every process gets process 0's answer."""
  have = np.asarray([os.path.isfile(os.path.join(out, it.file)) for it in items], np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    have = np.asarray(multihost_utils.broadcast_one_to_all(have))
  return [it for it, h in zip(items, have) if not h]


def claim_folder(out: str, identity: dict) -> None:
  """Write ``sample.json``, or check that the folder's images were made the same way."""
  path = os.path.join(out, "sample.json")
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if diff:
      raise SampleError(f"--out={out}: holds images of another model or setting (sample.json "
                        f"differs in {diff}); choose another folder")
    return
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
      json.dump(identity, f, indent=2)
      f.write("\n")


def sample(sampler: Sampler, identity: dict, prompts: Sequence[str], seeds: Sequence[int], out: str) -> dict:
  """Write every missing image of (prompts x seeds) into ``out`` (claimed with ``identity`` by
  :func:`claim_folder`) and the index; returns counts."""
  items = plan(len(prompts), seeds)
  todo = pending_items(out, items)
  b = sampler.batch
  log.info("%d images (%d prompts x %d seeds): %d exist, %d to sample in batches of %d into %s",
           len(items), len(prompts), len(seeds), len(items) - len(todo), len(todo), b, out)
  start = time.time()
  for k in range(0, len(todo), b):
    chunk = list(todo[k:k + b])
    chunk += [chunk[-1]] * (b - len(chunk))   # pad the last batch; the copies are not written
    images = sampler.batch_images(prompts, chunk)
    done = min(k + b, len(todo))
    if jax.process_index() == 0:
      for it, img in zip(chunk[:done - k], images):
        _write_png(os.path.join(out, it.file), img)
    rate = done / max(time.time() - start, 1e-9)
    log.info("sampled %d/%d (%d%%), %.2f images/s, ETA %.0fs", done, len(todo), 100 * done // len(todo),
             rate, (len(todo) - done) / rate)
  if jax.process_index() == 0:
    with open(os.path.join(out, "index.jsonl.partial"), "w") as f:
      for it in items:
        f.write(json.dumps({"prompt": prompts[it.prompt_index], "prompt_index": it.prompt_index,
                            "seed": it.seed, "file": it.file, "model": identity["model"],
                            "step": identity["step"]}) + "\n")
    os.replace(os.path.join(out, "index.jsonl.partial"), os.path.join(out, "index.jsonl"))
  return {"images": len(items), "sampled": len(todo), "existing": len(items) - len(todo)}
