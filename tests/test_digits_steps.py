"""The digits phases drive the trainer differently from the toy in two ways; both are checked here
against the trainer itself on the toy task (cheap to compile):

* stepping.AlignChunk (compiled k_ta TA updates, then a compiled generator update, unrolled) gives
  the state and metrics of ``compile_chunk(scan_chunk(AlignSteps.outer))``, and its warm-up form
  those of ``AlignSteps.ta_warmup``;
* a reward scaled by ``s`` with alpha_rew = beta = 1 has the gradient of alpha_rew = s (DI++, DI*)
  and of beta = 1 / s (DIDR with the DRP and with snis).
"""

import jax
import numpy as np
import pytest

from tests.toy_tiny import dump_state, tiny_config


def _toy(method):
  from didr_jax.toy import experiment
  cfg = tiny_config(method, 3)
  toy = experiment.Toy(cfg, devices=jax.devices()[:1])
  return cfg, toy, experiment.objective_config(cfg, method)


def _steps_and_state(cfg, toy, obj):
  from didr_jax.training import state as st
  from didr_jax.training.steps import StepConfig, make_outer_step
  gtx, ttx = st.make_optimizer(cfg.align.gen_optimizer), st.make_optimizer(cfg.align.ta_optimizer)
  steps = make_outer_step(toy.task, obj, StepConfig(cfg.align.batch, cfg.align.k_ta), gtx, ttx,
                          batch_sharding=toy.batch_sh)
  make = lambda: st.init_train_state(gen_params=jax.jit(st.copy_tree)(toy.gen_init),
                                     ta_params=jax.jit(st.copy_tree)(toy.ref_init), gen_tx=gtx,
                                     ta_tx=ttx, ema=False, seed=3, mesh=toy.mesh)
  return steps, make


@pytest.mark.parametrize("method", ["didr-drp", "dipp"])
def test_align_chunk_equals_scanned_outer_step(method):
  from didr_jax.digits.stepping import AlignChunk
  from didr_jax.training.state import shardings_of
  from didr_jax.training.steps import compile_chunk, scan_chunk
  cfg, toy, obj = _toy(method)
  assert cfg.align.k_ta == 2
  steps, make = _steps_and_state(cfg, toy, obj)
  frozen = {"ref": toy.ref_init}
  state = make()
  scanned = compile_chunk(scan_chunk(steps.outer, 1), state, frozen, None, toy.mesh, "outer")
  warm_scanned = compile_chunk(scan_chunk(steps.ta_warmup, 1), state, frozen, None, toy.mesh, "warm")
  ta = AlignChunk.compile_ta(steps, cfg.align.k_ta, state, frozen, None, toy.mesh)
  unrolled = AlignChunk(ta, AlignChunk.compile_gen(steps, state, frozen, None, toy.mesh, "gen"))
  warm_unrolled = AlignChunk(ta, state_shardings=shardings_of(state))
  a, b = make(), make()
  for i in range(3):
    chunk_a, chunk_b = (warm_scanned, warm_unrolled) if i == 0 else (scanned, unrolled)
    a, ma = chunk_a(a, frozen, None)
    b, mb = chunk_b(b, frozen, None)
    assert sorted(ma) == sorted(mb)
    for k in ma:
      np.testing.assert_allclose(np.asarray(mb[k]), np.asarray(ma[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  da, db = dump_state(a), dump_state(b)
  assert int(da[".step"]) == 3
  for k in da:
    np.testing.assert_allclose(db[k], da[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("method, drs, scale", [("dipp", "drp", 3.0), ("distar", "drp", 3.0),
                                               ("didr", "drp", 0.4), ("didr", "snis", 0.4)])
def test_reward_scale_equals_objective_scale(method, drs, scale):
  from didr_jax.digits.phases import reward_scale
  from didr_jax.objectives import ObjectiveConfig, generator_loss
  cfg, toy, _ = _toy("dipp")
  problem, task = toy.problem, toy.task
  s = reward_scale(method, scale)
  assert s == (1.0 / scale if method == "didr" else scale)
  key = jax.random.split(jax.random.PRNGKey(5), 3)
  n = 256
  z, eps = jax.random.normal(key[0], (n, 1)), jax.random.normal(key[1], (n, 1))
  t = jax.random.uniform(key[2], (n,), minval=0.02, maxval=0.98)
  ta_params = jax.tree.map(lambda p: p * 1.01, toy.ref_init)   # TA != reference: nonzero KL term

  def grads(obj, reward_factor):
    def loss(p):
      return generator_loss(obj, generate=lambda zz, c: task.generator_apply(p, zz, c),
                            ta=task.denoiser(ta_params), ref=task.denoiser(toy.ref_init, obj.cfg_w),
                            reward=lambda x0, c: reward_factor * problem.reward(x0),
                            schedule=task.schedule, z=z, cond=None, t=t, eps=eps,
                            keys=jax.random.split(key[0], n))[0]
    return jax.jit(jax.grad(loss))(toy.gen_init)

  base = dict(method=method, weighting="plain" if method == "distar" else "dmd2", drs=drs, drp_k=2,
              snis_k=2, snis_m=4)   # DI* has its own w(t)
  if method == "didr":
    direct = ObjectiveConfig(**base, beta=scale)
  else:
    direct = ObjectiveConfig(**base, alpha_rew=scale)
  via_reward = ObjectiveConfig(**base, alpha_rew=1.0, beta=1.0)
  g1, g2 = grads(direct, 1.0), grads(via_reward, s)
  unscaled = grads(via_reward, 1.0)
  for x, y, u in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(unscaled)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-5, atol=1e-6)
  assert any(not np.allclose(x, u, rtol=1e-3) for x, u in zip(jax.tree.leaves(g1), jax.tree.leaves(unscaled)))
