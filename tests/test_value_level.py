"""Value-level tests of what a text-to-image run executes, against closed forms computed here.

The reference and the TA are an ANALYTIC conditional Gaussian "UNet": x0 | c ~ N(mu(c), v(c) I) on
the discrete VP schedule, so E[x0 | x_t, c] = mu + a v / (a^2 v + s^2) (x_t - a mu) in closed form;
the module returns it as eps (the T2I task's prediction) and runs through the real ``T2I`` task's
``network_apply`` (SDXL: context, pooled, time_ids; SD1.5: context), its ``uncond`` and
``generator_apply``. Every expected value is computed in numpy (float64) from an independent
abar table, never from the code under test. DRP and DI*: tests/test_value_level_drp_distar.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import sd15, sdxl
from didr_jax.diffusion import Schedule
from didr_jax.pipelines import backbones, experiment
from didr_jax.pipelines.conditioning import PromptEncoder
from didr_jax.pipelines.t2i import T2I
from didr_jax.training import state as st
from didr_jax.training.loop import run_chunks
from didr_jax.training.steps import StepConfig, make_outer_step, scan_chunk

SCHED = Schedule(kind="discrete_vp", betas="scaled_linear")          # as T2I.__init__ builds it
SHAPE = (2, 2, 4)                                                     # 2x2 latents, 4 channels
DIM = int(np.prod(SHAPE))
B = 8
# abar_t of SD / SDXL (scaled_linear, 0.00085 .. 0.012), independently of didr_jax, in float64
ABAR = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)
CONFIGS = {"sdxl": sdxl.get_config, "sd15": sd15.get_config}
EMPTY = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)   # SD1.5's encoding of ""


def np_as(t):
  t = np.asarray(t)
  assert np.all(t == np.round(t)), t
  ab = ABAR[t.astype(int)]
  return np.sqrt(ab), np.sqrt(1.0 - ab)


def gauss_params(seed, mu_scale, v0):
  """mu(c) = mu0 + f(c) mw, v(c) = exp(log_v0 + f(c) . vw); f(c): 3 features of the conditioning."""
  rng = np.random.default_rng(seed)
  return {"mu0": mu_scale * rng.normal(size=DIM), "mw": 0.7 * rng.normal(size=(3, DIM)),
          "log_v0": np.log(v0), "vw": 0.4 * rng.normal(size=3)}


REF = gauss_params(0, 1.0, 0.6)
TA = gauss_params(1, 0.7, 1.1)


def np_features(cond, backbone):
  ctx = np.asarray(cond["context"], np.float64)
  if backbone == "sdxl":
    return np.concatenate([ctx[:, 0, :2], np.asarray(cond["pooled"], np.float64)[:, :1]], -1)
  return ctx[:, 0, :3]


def np_uncond_features(n, backbone):
  """Features of the unconditional input: SDXL zero context and pooled; SD1.5 the empty prompt."""
  return np.zeros((n, 3)) if backbone == "sdxl" else np.tile(EMPTY[0, :3].astype(np.float64), (n, 1))


def np_gauss(p, f, x, t):
  """(D, eps, gain, mu, v) of the exact denoiser; x [n, DIM] float64, t integer timesteps [n]."""
  a, s = np_as(t)
  mu = p["mu0"] + f @ p["mw"]
  v = np.exp(p["log_v0"] + f @ p["vw"])
  gain = a * v / (a ** 2 * v + s ** 2)
  d = mu + gain[:, None] * (x - a[:, None] * mu)
  return d, (x - a[:, None] * d) / s[:, None], gain, mu, v


class GaussEps(nnx.Module):
  """UNet stand-in (same call signature): eps of the exact denoiser of N(mu(c), v(c) I)."""

  def __init__(self, p, dtype=jnp.float32):
    self.mu0 = nnx.Param(jnp.asarray(p["mu0"], jnp.float32))
    self.mw = nnx.Param(jnp.asarray(p["mw"], jnp.float32))
    self.log_v0 = nnx.Param(jnp.asarray(p["log_v0"], jnp.float32))
    self.vw = nnx.Param(jnp.asarray(p["vw"], jnp.float32))
    self.dtype = dtype

  def __call__(self, x, t, context, text_embeds=None, time_ids=None):
    f = context[:, 0, :3] if text_embeds is None else jnp.concatenate(
        [context[:, 0, :2], text_embeds[:, :1]], -1)
    f = f.astype(jnp.float32)
    mu = (self.mu0[...] + f @ self.mw[...]).reshape(x.shape)
    v = jnp.exp(self.log_v0[...] + f @ self.vw[...])
    a, s = SCHED.alpha_sigma(t)
    col = lambda c: c.reshape((-1,) + (1,) * (x.ndim - 1))
    d = mu + col(a * v / (a ** 2 * v + s ** 2)) * (x - col(a) * mu)
    return ((x - col(a) * d) / col(s)).astype(self.dtype)


def t2i_task(backbone, graph, **model):
  """The real ``T2I._task`` over ``graph`` (no weights, towers or reward are built); ``model``
  overrides cfg.model fields. Returns (task, cfg)."""
  cfg = CONFIGS[backbone]("")
  for k, v in model.items():
    setattr(cfg.model, k, v)
  pipe = T2I.__new__(T2I)
  pipe.cfg, pipe.schedule, pipe.net_graph, pipe.latent = cfg, SCHED, graph, SHAPE[0]
  pipe.backbone, pipe.lora = backbones.get(backbone), None
  # the SD1.5 encoder's unconditional input is its stored encoding of "" (no tower is called)
  empty = None if backbone == "sdxl" else {"context": jnp.asarray(EMPTY)}
  pipe.encoder = PromptEncoder(backbone, [], None, resolution=16, dtype=jnp.float32, block=1,
                               empty=empty)
  return pipe._task(), cfg


def make_cond(backbone, seed, n=B):
  rng = np.random.default_rng(seed)
  c = {"context": (0.8 * rng.normal(size=(n, 3, 4))).astype(np.float32),
       "reward_ids": rng.integers(2, 99, (n, 5)).astype(np.int32)}
  if backbone == "sdxl":
    c["pooled"] = (0.8 * rng.normal(size=(n, 2))).astype(np.float32)
    c["time_ids"] = np.tile(np.float32([[16, 16, 0, 0, 16, 16]]), (n, 1))
  return {k: jnp.asarray(v) for k, v in c.items()}


def flat(x):
  return np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)


def test_abar_table_is_the_schedules():
  a, s = SCHED.alpha_sigma(jnp.arange(1000.0))
  np.testing.assert_allclose(np.asarray(a) ** 2, ABAR, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(s) ** 2, 1 - ABAR, rtol=2e-5, atol=1e-7)


# ---- 1. the guided Task.denoiser on the T2I task -------------------------------------------------

@pytest.mark.parametrize("backbone", ["sdxl", "sd15"])
def test_guided_denoiser_is_augmented_cfg_of_cond_and_uncond(backbone):
  """D~ = D_c + w (D_c - D_u) and eps~ = eps_c + w (eps_c - eps_u), w = the config's cfg_w, with
  D_u the exact denoiser of the unconditional input (SDXL: zero context and pooled; SD1.5: the
  empty prompt). Swapping cond and uncond gives D_u + w (D_u - D_c), which fails the same tolerance
  on every row (at t = 0, 1 too, where x_t nearly fixes D)."""
  graph, ref = nnx.split(GaussEps(REF))
  task, cfg = t2i_task(backbone, graph)
  w = float(cfg.objective.cfg_w)
  assert w == {"sdxl": 7.5, "sd15": 0.75}[backbone]
  cond = make_cond(backbone, 1)
  x = jnp.asarray(1.5 * np.random.default_rng(2).normal(size=(B,) + SHAPE), jnp.float32)
  t = jnp.asarray([0, 1, 157, 399, 500, 731, 980, 999], jnp.float32)

  @jax.jit
  def run(p, x, t, c):
    return (task.denoiser(p, w)(x, t, c, True), task.denoiser(p, w)(x, t, c, False),
            task.denoiser(p, 0.0)(x, t, c, True), task.uncond(c))

  guided, plain, unguided, uncond = run(ref, x, t, cond)
  d_c, e_c, *_ = np_gauss(REF, np_features(cond, backbone), flat(x), t)
  d_u, e_u, *_ = np_gauss(REF, np_uncond_features(B, backbone), flat(x), t)
  tol = dict(rtol=2e-5, atol=2e-4)
  np.testing.assert_allclose(flat(guided[0]), d_c + w * (d_c - d_u), **tol)
  np.testing.assert_allclose(flat(guided[1]), e_c + w * (e_c - e_u), **tol)
  for out in (plain, unguided):      # guided=False, and cfg_w = 0: the conditional model alone
    np.testing.assert_allclose(flat(out[0]), d_c, **tol)
    np.testing.assert_allclose(flat(out[1]), e_c, **tol)
  swapped = d_u + w * (d_u - d_c)
  assert not any(np.allclose(sw, ex, **tol) for sw, ex in zip(swapped, d_c + w * (d_c - d_u)))
  # the uncond mapping itself: only the text embeddings change
  ctx = np.asarray(uncond["context"])
  if backbone == "sdxl":
    assert not ctx.any() and not np.asarray(uncond["pooled"]).any()
    np.testing.assert_array_equal(uncond["time_ids"], cond["time_ids"])
  else:
    np.testing.assert_array_equal(ctx, np.broadcast_to(EMPTY, ctx.shape))
  np.testing.assert_array_equal(uncond["reward_ids"], cond["reward_ids"])


# ---- 2. the DIDR generator update with the t2i defaults (dmd2 weighting, guided reference) -------

BETA = 0.5
B_REW = np.random.default_rng(3).normal(size=DIM)                    # r(x0) = b . x0


def affine_generator(p, z, c):
  return (z.reshape(z.shape[0], -1) @ p["A"].T + p["c"]).reshape(z.shape)


def linear_reward(frozen, x0, c):
  return x0.reshape(x0.shape[0], -1) @ jnp.asarray(B_REW, jnp.float32)


def gaussian_exact_drs(x, t, c):
  """DRS of the conditional reference prior N(mu_c, v_c I) under r = b . x0: a v_c b / (beta v_t)."""
  f = jnp.concatenate([c["context"][:, 0, :2], c["pooled"][:, :1]], -1)
  v = jnp.exp(REF["log_v0"] + f @ jnp.asarray(REF["vw"], jnp.float32))
  a, s = SCHED.alpha_sigma(t)
  coef = a * v / (BETA * (a ** 2 * v + s ** 2))
  return (coef[:, None] * jnp.asarray(B_REW, jnp.float32)).reshape(x.shape)


GEN = {"A": 0.8 * np.eye(DIM) + 0.1 * np.random.default_rng(4).normal(size=(DIM, DIM)),
       "c": 0.5 * np.random.default_rng(6).normal(size=DIM)}


MESH = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def on_mesh(tree):
  """Leaves replicated on the 1-device mesh, as a run creates its state (a jitted step's outputs
  carry this sharding, so inputs without it would be a different signature)."""
  return jax.device_put(tree, jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec()))


def sgd_generator_step(task, obj, ta_params, ref_params, cond, seed=0):
  """One real ``gen_update`` with SGD(lr=1): returns (gradient = old - new, metrics, z, t, eps),
  with z, t, eps redrawn as ``draw`` in didr_jax/training/steps.py draws them."""
  gen = on_mesh({k: jnp.asarray(v, jnp.float32) for k, v in GEN.items()})
  tx = optax.sgd(1.0)
  state = st.init_train_state(gen_params=gen, ta_params=on_mesh(ta_params), gen_tx=tx, ta_tx=tx,
                              ema=False, seed=seed, mesh=MESH)
  steps = make_outer_step(task, obj, StepConfig(B, 1), tx, tx)
  new, metrics = jax.jit(steps.gen_update)(state, {"ref": on_mesh(ref_params)}, cond)
  _, kz, kt, ke = jax.random.split(state.rng, 4)
  shape = (B,) + tuple(task.sample_shape)
  z, eps = jax.random.normal(kz, shape), jax.random.normal(ke, shape)
  t = task.sample_t(kt, B, task.gen_t_range)
  grad = {k: np.asarray(gen[k], np.float64) - np.asarray(new.gen_params[k], np.float64) for k in gen}
  return grad, {k: np.asarray(v) for k, v in metrics.items()}, flat(z), np.asarray(t), flat(eps)


def didr_task():
  graph, ref = nnx.split(GaussEps(REF))
  _, ta = nnx.split(GaussEps(TA))
  task, cfg = t2i_task("sdxl", graph)
  task = dataclasses.replace(task, generator_apply=affine_generator, reward_apply=linear_reward,
                             exact_drs=gaussian_exact_drs)
  cfg.method, cfg.objective.drs, cfg.objective.beta = "didr", "exact", BETA
  return task, experiment.objective_config(cfg), ref, ta


def test_didr_dmd2_generator_gradient_equals_closed_form():
  """The SDXL default objective (dmd2 weighting, cfg_w = 7.5) with the exact DRS:
  grad = mean_b w'_b (D_ta - D~_ref - T_b) dx0_b/dtheta, w' = 1 / mean|x0 - D~_ref|, and
  T = (s^2/a) DRS = E_tilted[x0 | x_t] - E[x0 | x_t] = Var(x0 | x_t) b / beta (the posterior
  N(m, P) tilted by exp(b . x0 / beta) is N(m + P b / beta, P))."""
  task, obj, ref, ta = didr_task()
  assert (obj.weighting, obj.cfg_w, obj.method, task.gen_t_range) == ("dmd2", 7.5, "didr", (20, 980))
  cond = make_cond("sdxl", 7)
  grad, metrics, z, t, eps = sgd_generator_step(task, obj, ta, ref, cond)
  assert len(set(t.tolist())) == B and t.min() >= 20 and t.max() <= 980
  a, s = np_as(t)
  x0 = z @ GEN["A"].T + GEN["c"]
  x_t = a[:, None] * x0 + s[:, None] * eps
  f_c, f_u = np_features(cond, "sdxl"), np_uncond_features(B, "sdxl")
  d_ta = np_gauss(TA, f_c, x_t, t)[0]
  d_c, _, _, _, v_c = np_gauss(REF, f_c, x_t, t)
  d_g = d_c + 7.5 * (d_c - np_gauss(REF, f_u, x_t, t)[0])
  w = 1.0 / np.mean(np.abs(x0 - d_g), axis=1)
  post_var = v_c * s ** 2 / (a ** 2 * v_c + s ** 2)
  shift = (post_var / BETA)[:, None] * B_REW
  g = w[:, None] * (d_ta - d_g - shift)
  np.testing.assert_allclose(grad["c"], g.mean(0), rtol=2e-5, atol=5e-6)
  np.testing.assert_allclose(grad["A"], g.T @ z / B, rtol=2e-5, atol=5e-6)
  # the logged norms are the two parts of that gradient, and the reward is b . x0
  np.testing.assert_allclose(metrics["kl_grad_norm"],
                             np.mean(np.linalg.norm(w[:, None] * (d_ta - d_g), axis=1)), rtol=1e-5)
  np.testing.assert_allclose(metrics["drs_grad_norm"],
                             np.mean(np.linalg.norm(w[:, None] * shift, axis=1)), rtol=1e-5)
  np.testing.assert_allclose(metrics["ratio:reward"], [np.sum(x0 @ B_REW), B], rtol=1e-5, atol=1e-5)


def test_didr_step_moves_the_generator_up_the_reward():
  """Sign: with the TA equal to the (unguided) reference the KL part vanishes, and one descent step
  moves the generator's offset along +Var(x0 | x_t) b / beta, so the reward rises."""
  task, obj, ref, _ = didr_task()
  obj = dataclasses.replace(obj, cfg_w=0.0)
  cond = make_cond("sdxl", 8)
  grad, metrics, z, t, eps = sgd_generator_step(task, obj, ref, ref, cond, seed=3)
  a, s = np_as(t)
  x0 = z @ GEN["A"].T + GEN["c"]
  d_c, _, _, _, v_c = np_gauss(REF, np_features(cond, "sdxl"), a[:, None] * x0 + s[:, None] * eps, t)
  w = 1.0 / np.mean(np.abs(x0 - d_c), axis=1)
  coef = w * v_c * s ** 2 / (a ** 2 * v_c + s ** 2) / BETA           # per-row weight on +b
  np.testing.assert_allclose(-grad["c"], coef.mean() * B_REW, rtol=1e-5, atol=1e-6)
  assert float(-grad["c"] @ B_REW) > 0.0
  assert metrics["kl_grad_norm"] < 1e-5 * metrics["drs_grad_norm"]


# ---- 5. T2I.generator_apply: eps -> x0 at label_t ------------------------------------------------

class FakeEps(nnx.Module):
  """eps = k * x + t / 1000 + context[0, 0] (+ pooled[0] + time_ids[0] / 100 for SDXL)."""

  def __init__(self, dtype=jnp.float32):
    self.k = nnx.Param(jnp.asarray([0.3, -0.2, 0.5, 0.1], jnp.float32))
    self.dtype = dtype

  def __call__(self, x, t, context, text_embeds=None, time_ids=None):
    per_row = t / 1000.0 + context[:, 0, 0]
    if text_embeds is not None:
      per_row = per_row + text_embeds[:, 0] + time_ids[:, 0] / 100.0
    return (self.k[...] * x + per_row[:, None, None, None]).astype(self.dtype)


@pytest.mark.parametrize("backbone, label_t, scale", [("sdxl", None, 1.0), ("sdxl", 250, 0.7),
                                                      ("sd15", None, 1.0)])
def test_generator_reads_x0_from_eps_at_label_t(backbone, label_t, scale):
  """x0 = (x_in - s* eps(x_in, t*, c)) / a*, x_in = input_scale z, t* = model.label_t (SDXL 399,
  SD1.5 999 by default), in float32 also when the UNet computes in bfloat16."""
  model = {"input_scale": scale} if label_t is None else {"input_scale": scale, "label_t": label_t}
  cond = make_cond(backbone, 9)
  z = jnp.asarray(np.random.default_rng(10).normal(size=(B,) + SHAPE), jnp.float32)
  graph, gen = nnx.split(FakeEps())
  task, cfg = t2i_task(backbone, graph, **model)
  t_star = int(cfg.model.label_t)
  assert t_star == (label_t or {"sdxl": 399, "sd15": 999}[backbone])
  x0 = jax.jit(task.generator_apply)(gen, z, cond)
  x_in = scale * np.asarray(z, np.float64)
  per_row = t_star / 1000.0 + np.asarray(cond["context"])[:, 0, 0]
  if backbone == "sdxl":
    per_row = per_row + np.asarray(cond["pooled"])[:, 0] + np.asarray(cond["time_ids"])[:, 0] / 100
  eps = np.asarray([0.3, -0.2, 0.5, 0.1]) * x_in + per_row[:, None, None, None]
  a, s = np_as(t_star)
  expected = (x_in - s * eps) / a
  assert x0.dtype == jnp.float32 and x0.shape == z.shape
  np.testing.assert_allclose(np.asarray(x0), expected, rtol=1e-5, atol=2e-5)
  graph16, gen16 = nnx.split(FakeEps(jnp.bfloat16))
  x0_16 = jax.jit(t2i_task(backbone, graph16, **model)[0].generator_apply)(gen16, z, cond)
  assert x0_16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x0_16), expected, atol=0.05 * s / a * np.abs(eps).max())


# ---- 6. replaces the trace counter on an AOT-compiled chunk (tests/test_t2i_pipeline.py) ----------

def test_jitted_outer_step_chunks_keep_their_avals():
  """run_chunks over a jitted (not AOT) chunk of the real outer step (TA + DIDR generator update)
  traces it once over 3 chunks: every state leaf keeps its shape, dtype and weak type from chunk to
  chunk (an AOT-compiled chunk would refuse such a state). The counter works: a chunk that turns
  ``bad_steps`` into int16 is traced again."""
  task, obj, ref, ta = didr_task()
  tx = optax.adam(1e-3)
  steps = make_outer_step(task, obj, StepConfig(B, 2), tx, tx)
  conds = [make_cond("sdxl", 20 + i) for i in range(6)]
  stacked = lambda s: jax.tree.map(lambda *v: jnp.stack(v), *conds[s:s + 2])

  def run(drift):
    traces = [0]

    def counted(state, frozen, cond):
      traces[0] += 1
      return steps.outer(state, frozen, cond)

    def chunk(state, frozen, conds_):
      state, metrics = scan_chunk(counted, 2)(state, frozen, conds_)
      return (state.replace(bad_steps=state.bad_steps.astype(jnp.int16)) if drift else state), metrics

    gen = on_mesh({k: jnp.asarray(v, jnp.float32) for k, v in GEN.items()})
    state = st.init_train_state(gen_params=gen, ta_params=on_mesh(ta), gen_tx=tx, ta_tx=tx, ema=True,
                                seed=0, mesh=MESH)
    final = run_chunks(name="v", state=state, frozen={"ref": on_mesh(ref)}, chunk=jax.jit(chunk),
                       steps_per_chunk=2, num_steps=6, conds_for=stacked, writer=None)
    return traces[0], final, gen

  traces, final, gen = run(False)
  assert traces == 1 and int(final.step) == 6 and int(final.bad_steps) == 0
  assert float(np.max(np.abs(np.asarray(final.gen_params["c"]) - np.asarray(gen["c"])))) > 1e-3
  assert run(True)[0] == 2
