"""The digits problem built once per run: data, networks, the trainer's Task and its conditioning.

Task (the interface the toy and t2i use):
  network_apply(p, x_t, t, cond)  = LabelConditionedUNet eps prediction, cond = {"label": [B] int}
  generator_apply(p, z, cond)     = x0 read out of the same UNet at the label time t*:
                                    (z - s* eps) / a*  (input z ~ N(0, I) taken as x_{t*})
  reward_apply(frozen, x0, cond)  = frozen["reward_scale"] * log p_clf(label | clip(x0, -1, 1) at 8x8)
  uncond(cond)                    = {"label": NULL_LABEL}: CFG's unconditional branch
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from didr_jax import sharding
from didr_jax.diffusion import ddim_sample, make_schedule
from didr_jax.digits import data as dd
from didr_jax.digits.networks import (LabelConditionedUNet, init_on_host, label_log_prob, make_classifier,
                                      unet_config)
from didr_jax.training.task import Task

CLASSIFIERS = ("reward", "heldout", "features")
DDIM_BLOCK = 128      # rows per call of the guided DDIM sampler (see Digits.guided_ddim_samples)


class Digits:
  """Networks, task and shardings of the digits experiment."""

  def __init__(self, cfg, devices=None):
    self.cfg = cfg
    self.split = dd.load_split(cfg.data.test_fraction, cfg.seed)
    self.resolution = int(cfg.data.resolution)
    self.schedule = make_schedule(cfg.schedule)
    self.mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
    self.rules = sharding.get_rules(cfg.mesh.rules)
    ucfg = unet_config(cfg.unet, self.resolution)
    self.unet_graph, self.unet_init = init_on_host(
        lambda: LabelConditionedUNet(ucfg, cfg.unet.label_tokens, rngs=nnx.Rngs(0)),
        self.mesh, self.rules, cfg.seed)
    self.clf_graph, self.clf_init = {}, {}
    for name in CLASSIFIERS:
      c = cfg.classifiers[name]
      self.clf_graph[name], self.clf_init[name] = init_on_host(
          lambda c=c: make_classifier(c, 0), self.mesh, self.rules, int(c.seed))
    self.batch_sh = sharding.batch_sharding(self.mesh, 4)
    self.label_sh = sharding.batch_sharding(self.mesh, 1)
    self.repl = sharding.replicated(self.mesh)
    self.task = self._task()
    self._ddim = None

  # ---- the trainer's Task ----
  def _task(self) -> Task:
    cfg, sched, graph = self.cfg, self.schedule, self.unet_graph
    label_t = float(cfg.generator.label_t)
    a_star, s_star = (float(v) for v in sched.alpha_sigma(label_t))

    def network_apply(p, x, t, c):
      return nnx.merge(graph, p)(x, t, c["label"])

    def generator_apply(p, z, c):
      t = jnp.full((z.shape[0],), label_t, jnp.float32)
      eps = network_apply(p, z, t, c).astype(jnp.float32)
      return (z.astype(jnp.float32) - s_star * eps) / a_star

    r = self.resolution
    return Task(schedule=sched, prediction="eps", sample_shape=(r, r, 1),
                generator_apply=generator_apply, network_apply=network_apply,
                reward_apply=lambda frozen, x0, c: frozen["reward_scale"] * self.log_prob(
                    "reward", frozen["clf"], x0, c["label"]),
                ta_t_range=tuple(cfg.align.ta_t_range), gen_t_range=tuple(cfg.align.gen_t_range),
                uncond=lambda c: {"label": jnp.full_like(c["label"], dd.NULL_LABEL)})

  # ---- classifiers (native 8x8 inputs; model-resolution images are clipped and pooled) ----
  def logits(self, name: str, params, images):
    native = dd.to_native(jnp.clip(images.astype(jnp.float32), -1.0, 1.0))
    return nnx.merge(self.clf_graph[name], params)(native)

  def log_prob(self, name: str, params, images, labels):
    return label_log_prob(self.logits(name, params, images), labels)

  def features(self, params, images):
    native = dd.to_native(jnp.clip(images.astype(jnp.float32), -1.0, 1.0))
    return nnx.merge(self.clf_graph["features"], params).features(native)

  # ---- conditioning ----
  def step_labels(self, step: int) -> np.ndarray:
    """Labels of alignment step ``step``: every class equally often (a rotation of 0..9 by the
    step), so the batch is a function of the step alone and a resumed run sees the same labels."""
    b = self.cfg.align.batch
    return ((np.arange(b) + step) % dd.NUM_CLASSES).astype(np.int32)

  def conds(self, step: int, n: int) -> dict:
    """{"label": [n, B]} of steps [step, step + n), batch axis sharded."""
    labels = np.stack([self.step_labels(step + i) for i in range(n)])
    sh = NamedSharding(self.mesh, P(None, ("data", "fsdp")))
    return {"label": jax.device_put(labels, sh)}

  # ---- data on device ----
  def train_data(self) -> dict:
    """Replicated train images (model resolution) and labels: the pre-training phases' data."""
    x = dd.to_model(jnp.asarray(self.split.train_images), self.resolution)
    return {"x": jax.device_put(x, self.repl),
            "y": jax.device_put(jnp.asarray(self.split.train_labels), self.repl)}

  def constrain(self, x):
    sh = self.batch_sh if x.ndim == 4 else self.label_sh
    return jax.lax.with_sharding_constraint(x, sh)

  # ---- sampling ----
  def ddim_grid(self, steps: int):
    """``steps`` integer timesteps from T-1 down to 0."""
    top = self.schedule.num_train_timesteps - 1
    return jnp.round(jnp.linspace(top, 0, steps))

  def reference_samples(self, ref_params, z, labels, steps: int, cfg_w: float):
    """Guided (augmented CFG ``cfg_w``) deterministic DDIM samples of the reference."""
    denoise = self.task.denoiser(ref_params, cfg_w)
    return ddim_sample(lambda x, t, c: denoise(x, t, c, True), z, self.ddim_grid(steps),
                       self.schedule, {"label": labels})

  def guided_ddim_samples(self, ref_params, z, labels):
    """``reference_samples`` with ``distill.ddim_steps`` steps and ``objective.cfg_w``, computed in
    blocks of DDIM_BLOCK rows (the last one padded): one compiled program serves the distillation
    pool and the reference's evaluation samples. Returns a replicated array [len(z), ...]."""
    if self._ddim is None:
      steps, w = int(self.cfg.distill.ddim_steps), float(self.cfg.objective.cfg_w)
      self._ddim = jax.jit(lambda p, zb, yb: self.reference_samples(p, zb, yb, steps, w),
                           out_shardings=self.repl)
    n = z.shape[0]
    pad = -n % DDIM_BLOCK
    z = jnp.concatenate([z, jnp.zeros((pad,) + z.shape[1:], z.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    out = [self._ddim(ref_params, jax.device_put(z[i:i + DDIM_BLOCK], self.batch_sh),
                      jax.device_put(labels[i:i + DDIM_BLOCK], self.label_sh))
           for i in range(0, n + pad, DDIM_BLOCK)]
    return jnp.concatenate(out)[:n]

  def generate(self, gen_params, z, labels):
    return self.task.generator_apply(gen_params, z, {"label": labels})

  def noise(self, seed: int, n: int):
    r = self.resolution
    return jax.jit(lambda: jax.random.normal(jax.random.PRNGKey(seed), (n, r, r, 1)),
                   out_shardings=self.batch_sh)()
