"""The text-to-image Task: denoisers (generator, reference, TA), VAE, text encoders and a reward.

generator(z, c) = x0 read out from the network at label_t on input_scale * z (float32);
reference/TA = the backbone's network (UNet or DiT) on its schedule (pipelines.backbones);
reward(x0, c) = r(clip(VAE.decode(unscaled x0), -1, 1), prompt ids) in float32.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax import log, sharding
from didr_jax.diffusion.parameterization import to_denoiser
from didr_jax.models.layers import DTYPES
from didr_jax.objectives import variance_table
from didr_jax.pipelines import backbones, lora_training
from didr_jax.pipelines.conditioning import PromptEncoder, PromptTable
from didr_jax.training.state import abstract_of, copy_tree
from didr_jax.training.task import Task


def model_kwargs(cfg, mesh, rules) -> dict:
  m = cfg.model
  return dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], mesh=mesh, rules=rules,
              attention=m.attention, remat=m.remat, cache_dir=m.cache_dir or None)


def load_tokenizer(family: str, folder: str):
  """The prompt tokenizer of a text-encoder family, from local files."""
  if family == "t5":
    from didr_jax.text.t5_tokenize import load_t5_tokenizer
    return load_t5_tokenizer(folder)
  if family == "qwen3":
    from didr_jax.text.qwen3_tokenize import load_qwen3_tokenizer
    return load_qwen3_tokenizer(folder)
  from didr_jax.text import load_clip_tokenizer
  return load_clip_tokenizer(folder)


def load_vae_and_towers(cfg, mesh, rules, text_mesh) -> dict:
  """The reference's VAE and text towers from disk: dict(vae_graph, vae, vae_config, towers)."""
  from didr_jax.models import from_transformers, text_family
  from didr_jax.models.diffusers_loading import from_diffusers
  m, kw = cfg.model, model_kwargs(cfg, mesh, rules)
  vae = from_diffusers(os.path.join(m.reference, "vae"), **dict(kw, dtype=DTYPES[m.vae_dtype]))
  vae_graph, vae_params = nnx.split(vae)
  towers = []
  for enc, tok in backbones.get(cfg.backbone).towers:
    folder = os.path.join(m.reference, enc)
    model = from_transformers(folder, dtype=DTYPES[m.dtype], mesh=text_mesh,
                              rules=sharding.get_rules("replicated"))
    g, p = nnx.split(model)
    towers.append((load_tokenizer(text_family(folder), os.path.join(m.reference, tok)), g, p))
  return dict(vae_graph=vae_graph, vae=vae_params, vae_config=vae.config, towers=towers)


def load_reward(cfg, mesh):
  """The reward placed with the run's rules (FSDP shards it like the UNets: replicated, a
  ViT-H/14 reward in float32 is 3.7 GiB on every chip, docs/plan.md)."""
  from didr_jax import rewards
  r = cfg.reward
  rkw = {k: getattr(r, k) for k in ("clip", "tokenizer") if getattr(r, k)}
  if r.clip_config:
    rkw["config" if r.name != "aesthetic" else "clip_config"] = r.clip_config
  return rewards.load(r.name, r.path, mesh=mesh, rules=sharding.get_rules(cfg.mesh.rules), **rkw)


def _load_real(cfg, mesh, rules, text_mesh):
  """Weights from disk (paths already checked by ``validate``)."""
  from didr_jax.models.diffusers_loading import from_diffusers
  m, kw = cfg.model, model_kwargs(cfg, mesh, rules)
  b = backbones.get(cfg.backbone)
  net = from_diffusers(os.path.join(m.reference, b.network_folder), **kw)
  net_graph, ref = nnx.split(net)
  gen = load_generator(m.generator, b.network_class, net.config, kw)[1] if m.generator else None
  return dict(load_vae_and_towers(cfg, mesh, rules, text_mesh), net_graph=net_graph, ref=ref,
              gen=gen, reward=load_reward(cfg, mesh))


def load_generator(path: str, class_name: str, net_config, kw):
  """(graph, params) of a diffusers model folder, or of one safetensors file in diffusers naming
  with architecture ``net_config`` (the reference's) of class ``class_name``."""
  from didr_jax.models.diffusers_loading import KINDS, abstract_for, from_diffusers, prepare_tensors
  from didr_jax.weights import load_state, read_safetensors
  if os.path.isdir(path):
    return nnx.split(from_diffusers(path, **kw))
  graph, abs_state = abstract_for(class_name, net_config, dtype=kw["dtype"],
                                  param_dtype=kw["param_dtype"], attention=kw["attention"],
                                  remat=kw["remat"], mesh=kw["mesh"], rules=kw["rules"])
  tensors = prepare_tensors(read_safetensors(path), class_name, net_config, path)
  return graph, load_state(abs_state, tensors, KINDS[class_name].rules(net_config), what=path)


def network_rules(graph, params):
  """The diffusers mapping table of a network (where LoRA finds its target modules)."""
  from didr_jax.models.diffusers_loading import KINDS, _kind_of_model
  model = nnx.merge(graph, params)
  return KINDS[_kind_of_model(model)[0]].rules(model.config)


def vae_factor(vae_config) -> int:
  """Pixels per latent: 2 ** (levels - 1) (8 for SD / SDXL VAEs)."""
  return 2 ** (len(vae_config.block_out_channels) - 1)


def one_step_x0(network_apply, schedule, prediction: str, label_t: float, scale: float):
  """(params, z, cond) -> x0 in float32: the network at time ``label_t`` on ``scale * z``, read
  out as its denoiser D (eps: (x - s eps) / a; flow: x - s u at a + s = 1)."""
  def apply(p, z, c):
    t = jnp.full((z.shape[0],), label_t, jnp.float32)
    x_in = scale * z.astype(jnp.float32)
    out = network_apply(p, x_in, t, c).astype(jnp.float32)
    a, s = schedule.alpha_sigma(label_t)
    return to_denoiser(out, x_in, a, s, prediction)[0]
  return apply


def decode(vae_graph, vae_params, x0):
  """Latents (model scale) -> images in [-1, 1], float32."""
  vae = nnx.merge(vae_graph, vae_params)
  img = vae.decode(vae.unscale_latents(x0.astype(jnp.float32)).astype(vae.dtype))
  return jnp.clip(img.astype(jnp.float32), -1.0, 1.0)


class T2I:
  """Models, Task and shardings of one text-to-image alignment run."""

  def __init__(self, cfg, devices=None, parts: dict | None = None):
    """``parts``: prebuilt models (``didr_jax.pipelines.plan`` passes abstract ones), else the
    ``:tiny`` random models or the run's checkpoints."""
    self.cfg = cfg
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
    self.rules = sharding.get_rules(cfg.mesh.rules)
    local = [d for d in devices if d.process_index == jax.process_index()]
    self.text_mesh = sharding.make_mesh((1, 1, 1), devices=local[:1])
    m = cfg.model
    if parts is not None:
      parts = dict(parts)
    elif cfg.variant == "tiny":
      from didr_jax.pipelines import tiny
      parts = tiny.build(cfg.backbone, seed=cfg.seed, mesh=self.mesh, rules=self.rules,
                         dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                         vae_dtype=DTYPES[m.vae_dtype], text_mesh=self.text_mesh,
                         width=cfg.tiny.width, vae_width=cfg.tiny.vae_width)
      parts["gen"] = None
    else:
      parts = _load_real(cfg, self.mesh, self.rules, self.text_mesh)
    self.backbone = backbones.get(cfg.backbone)
    self.net_graph, self.vae_graph = parts["net_graph"], parts["vae_graph"]
    self.ref_params, self.vae_params = parts["ref"], parts["vae"]
    # generator = copy of the reference unless a one-step checkpoint is given
    self.gen_init = parts["gen"] if parts["gen"] is not None else parts["ref"]
    self.vae_config, self.reward = parts["vae_config"], parts["reward"]
    self.lora = lora_training.from_config(cfg, network_rules(self.net_graph, self.ref_params))
    # a generator loaded from its own checkpoint keeps its own frozen base under LoRA
    self.gen_base = parts["gen"] if self.lora and self.lora.adapts("gen") else None
    self.encoder = PromptEncoder(cfg.backbone, parts["towers"], self.reward.tokenizer,
                                 resolution=cfg.data.resolution, dtype=DTYPES[m.dtype],
                                 block=cfg.align.batch // jax.process_count(),
                                 empty=parts.get("empty"))
    self._table = None  # (prompt-set fingerprint, host rows of every prompt) when precomputed
    self.latent = cfg.data.resolution // vae_factor(self.vae_config)
    self.schedule = self.backbone.make_schedule(cfg)
    self.batch_sh = sharding.batch_sharding(self.mesh, 4)
    self.task = self._task()

  def frozen(self) -> dict:
    frozen = {"ref": self.ref_params, "vae": self.vae_params, "reward": self.reward.params}
    if self.gen_base is not None:
      frozen["gen_base"] = self.gen_base
    return frozen

  def initial_trainables(self) -> tuple:
    """(gen_params, ta_params) of step 0: fresh adapters of the adapted networks (LoRA), fresh
    copies of the generator's initialisation and of the reference otherwise."""
    copy = jax.jit(copy_tree)
    key = jax.random.PRNGKey(self.cfg.seed + 11)
    with sharding.model_context(self.mesh, self.rules):
      gen = (self.lora.init(self.gen_init, key) if self.lora and self.lora.adapts("gen")
             else copy(self.gen_init))
      ta = (self.lora.init(self.ref_params, jax.random.fold_in(key, 1))
            if self.lora and self.lora.adapts("ta") else copy(self.ref_params))
    return gen, ta

  def abstract_trainables(self) -> tuple:
    """The shapes and shardings of :meth:`initial_trainables` (restore targets, compile plans)."""
    of = lambda role, base: (self.lora.abstract(base) if self.lora and self.lora.adapts(role)
                             else abstract_of(base))
    return of("gen", self.gen_init), of("ta", self.ref_params)

  def _task(self) -> Task:
    cfg = self.cfg
    network_apply = backbones.network_apply(self.backbone, self.net_graph, self.schedule)
    b = self.backbone
    return Task(schedule=self.schedule, prediction=b.prediction,
                sample_shape=(self.latent, self.latent, b.latent_channels),
                generator_apply=one_step_x0(network_apply, self.schedule, b.prediction,
                                            float(cfg.model.label_t), float(cfg.model.input_scale)),
                network_apply=network_apply, reward_apply=self.reward_apply,
                ta_t_range=tuple(cfg.align.ta_t_range), gen_t_range=tuple(cfg.align.gen_t_range),
                uncond=self.encoder.uncond, network_params=lora_training.network_params(self.lora))

  def decode(self, vae_params, x0):
    return decode(self.vae_graph, vae_params, x0)

  def reward_apply(self, frozen, x0, c):
    return self.reward.apply(frozen["reward"], self.decode(frozen["vae"], x0), c.get("reward_ids"))

  def cond_sharding(self, ndim: int, batch_axis: int):
    """Axis ``batch_axis`` (the batch, behind any [steps] / [k_ta] axes) sharded over (data, fsdp)."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(self.mesh, P(*spec))

  def prompt_rows(self, sampler, position: int) -> dict:
    """This process's host cond rows at global step ``position``: looked up in the table of the
    whole prompt set (``data.precompute_embeddings``, encoded once) or encoded now."""
    if not self.cfg.data.precompute_embeddings:
      return self.encoder.encode(sampler.batch(position))
    if self._table is None or self._table[0] != sampler.fingerprint:
      table = PromptTable(self.encoder, sampler.prompts)
      log.info("precomputed the embeddings of %d prompts: %.1f MiB on the host",
               len(sampler.prompts), table.nbytes / 2 ** 20)
      self._table = (sampler.fingerprint, table)
    return self._table[1].lookup(sampler.indices(position))

  def conds(self, sampler, step: int, n: int) -> dict:
    """Conds of global steps [step, step + n), stacked [n, B, ...].

    With ``align.fresh_ta_prompts`` each step draws 1 + k_ta prompt batches (sampler positions
    step (1 + k_ta) + j): {"gen": j = 0 [n, B, ...], "ta": j = 1..k_ta [n, k_ta, B, ...]}, one
    per TA update as DMD2 draws them; otherwise the step's one batch (position = step) serves all.
    """
    import numpy as np
    per = 1 + self.cfg.align.k_ta if self.cfg.align.fresh_ta_prompts else 1
    rows = [[self.prompt_rows(sampler, (step + i) * per + j) for j in range(per)] for i in range(n)]
    to_device = lambda v, axis: jax.make_array_from_process_local_data(self.cond_sharding(v.ndim, axis), v)
    gen = {k: to_device(np.stack([r[0][k] for r in rows]), 1) for k in rows[0][0]}
    if per == 1:
      return gen
    ta = {k: to_device(np.stack([np.stack([r[j][k] for j in range(1, per)]) for r in rows]), 2)
          for k in rows[0][0]}
    return {"gen": gen, "ta": ta}

  def gen_conds(self, conds) -> dict:
    """The generator's part of ``conds``."""
    return conds["gen"] if self.cfg.align.fresh_ta_prompts else conds

  def eval_inputs(self, prompts, seed: int):
    """Replicated (cond, z) for the fixed held-out prompts and seeds."""
    repl = sharding.replicated(self.mesh)
    host = self.encoder.encode(list(prompts))
    cond = {k: jax.device_put(v, repl) for k, v in host.items()}
    z = jax.device_put(jax.random.normal(jax.random.PRNGKey(seed),
                                         (len(prompts),) + tuple(self.task.sample_shape)), repl)
    return cond, z

  def variance_table(self, sampler, num_points: int = 64) -> dict:
    """The snis chains' variance table of the guided reference on initial-generator samples of the
    first training batch [choice: no data is at hand, and the initial generator is a distillation
    of the reference]."""
    cond = jax.tree.map(lambda v: v[0], self.gen_conds(self.conds(sampler, 0, 1)))
    key = jax.random.PRNGKey(self.cfg.seed + 300)
    shape = (self.cfg.align.batch,) + tuple(self.task.sample_shape)

    @jax.jit
    def compute(gen, ref, cond):
      z = jax.lax.with_sharding_constraint(jax.random.normal(key, shape), self.batch_sh)
      x0 = self.task.generator_apply(gen, z, cond)
      guided = self.task.denoiser(ref, float(self.cfg.objective.cfg_w))
      return variance_table(lambda x, t, c: guided(x, t, c, True), self.schedule, x0, cond,
                            jax.random.fold_in(key, 1),
                            jnp.linspace(*self.schedule.t_range, num_points))

    with jax.set_mesh(self.mesh):
      return compute(self.gen_init, self.ref_params, cond)

  def eval_fn(self):
    """jitted (gen_params, frozen, cond, z) -> (images [-1, 1], rewards)."""
    def run(gen_params, frozen, cond, z):
      x0 = self.task.generator_apply(self.task.params("gen", gen_params, frozen), z, cond)
      img = self.decode(frozen["vae"], x0)
      return img, self.reward.apply(frozen["reward"], img, cond.get("reward_ids"))
    return jax.jit(run)
