"""How far each DRS estimator of the sweep is from the DRS, per t-bin, on digits (no analytic prior).

The reference posterior gives (docs/method.md 3)

    (s_t^2 / a_t) DRS(x_t) = E_w[x0 | x_t] - E[x0 | x_t],   w = exp(r(x0) / beta),

so a Monte-Carlo reference needs posterior samples only. It uses the trainer's own posterior chain
(``posterior_drs.ancestral_chain`` with the local Tweedie variance) but with many more steps and
samples than any estimator (``eval.drs_check_steps`` x ``eval.drs_check_chains`` against snis'
K x M), jackknifed as snis is; its Monte-Carlo noise is reported with it (two independent halves
of the chains). So the check measures what the estimators' short chains, few samples or
deterministic DDIM Jacobian (the DRP) cost, not the reference network's own error (the toy, with
its exact posterior, measures that).

Each estimator's shift is computed by the trainer's ``diffused_reward_shift`` with the run's
objective at states x_t = a x0 + s eps from real test images. The bias measure is the projection
ratio sum <T_est, T_mc> / sum <T_a, T_b> per bin (T_a, T_b: the reference from two independent
halves of the chains, so the denominator estimates |T|^2 without the reference's noise, and the
estimator's own noise averages out of the numerator): 1 means unbiased along the reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from didr_jax.diffusion import broadcast_to
from didr_jax.digits.sweep import objective_config
from didr_jax.objectives.generator import diffused_reward_shift
from didr_jax.objectives.posterior_drs import ancestral_chain, jackknife_snis_coefficients


def snis_shift(samples, rewards, beta: float):
  """samples [S, M, ...], rewards [S, M] -> the jackknifed T [S, D] (snis_correction's formula)."""
  s, m = rewards.shape
  flat = samples.reshape(s, m, -1)
  coef, _ = jackknife_snis_coefficients(rewards / beta)
  return jnp.einsum("sm,smd->sd", coef, flat - jnp.mean(flat, axis=1, keepdims=True))


def drs_check(dg, ref_params, reward_params, betas, estimators, *, states_per_bin: int, chains: int,
              chain_steps: int, seed: int, drs_table=None) -> dict:
  """Per t-bin (4 bins of ``align.gen_t_range``, as the trainer's drs_to_kl metric), estimator and
  beta: mean |estimator shift|, mean |MC shift|, projection ratio, relative error
  mean |T_est - T_mc| / mean |T_mc|, mean cosine, and the reference's half-split noise."""
  cfg, task, sched = dg.cfg, dg.task, dg.schedule
  lo, hi = cfg.align.gen_t_range
  edges = np.linspace(lo, hi, 5)
  n = 4 * states_per_bin
  k0, kt, ke, kc, kest = jax.random.split(jax.random.PRNGKey(seed), 5)
  idx = np.asarray(jax.random.permutation(k0, len(dg.split.test_labels)))[:n] % len(dg.split.test_labels)
  x0 = jnp.asarray(dg.split.test_images[idx])
  labels = jnp.asarray(dg.split.test_labels[idx])
  u = np.asarray(jax.random.uniform(kt, (4, states_per_bin)))
  t = jnp.asarray(np.round(edges[:-1, None] + u * (edges[1] - edges[0])).reshape(-1), jnp.float32)
  a, s = sched.alpha_sigma(t)
  x_t = broadcast_to(a, x0) * x0 + broadcast_to(s, x0) * jax.random.normal(ke, x0.shape)
  ref = task.denoiser(ref_params, float(cfg.objective.cfg_w))
  guided = lambda x, tt, c: ref(x, tt, c, True)
  log_p = lambda x, c: dg.log_prob("reward", reward_params, x, c["label"])

  @jax.jit
  def chains_fn(x_t, t, labels):
    rep = lambda v: jnp.repeat(v, chains, axis=0)
    keys = jax.random.split(kc, n * chains)
    x = ancestral_chain(guided, sched, rep(x_t), rep(t), {"label": rep(labels)}, keys, chain_steps,
                        variance="local", var_max=float(cfg.objective.snis_var_max))
    r = log_p(x, {"label": rep(labels)})
    return x.reshape((n, chains) + x.shape[1:]), r.reshape(n, chains)

  def estimator_fn(est):
    """jitted (x_t, t, labels, beta) -> shift: beta = 1 in the objective and the reward scaled by
    1 / beta, as in the runs (one compile per estimator)."""
    obj = objective_config(cfg, "didr", est)
    return jax.jit(lambda x_t, t, labels, beta: diffused_reward_shift(
        obj, ref=ref, reward=lambda x, c: log_p(x, c) / beta, schedule=sched, x_t=x_t, t=t,
        cond={"label": labels}, keys=jax.random.split(kest, n), drs_table=drs_table)[0])

  samples, rewards = chains_fn(x_t, t, labels)
  out = {"t_edges": edges.tolist(), "states_per_bin": states_per_bin, "chains": chains,
         "chain_steps": chain_steps, "estimators": {}}
  half = chains // 2
  # states resampled per bin, the same resamples for every estimator and beta
  boot = np.random.default_rng(seed).integers(0, states_per_bin, (200, states_per_bin))
  per = lambda v: v.reshape(4, states_per_bin).mean(1)
  ratio = lambda num, den: (per(num) / np.maximum(per(den), 1e-12)).tolist()
  for est in estimators:
    rows = out["estimators"][est] = {}
    shift_of = estimator_fn(est)
    for beta in betas:
      mc = np.asarray(snis_shift(samples, rewards, float(beta))).reshape(n, -1)
      halves = [np.asarray(snis_shift(samples[:, sl], rewards[:, sl], float(beta))).reshape(n, -1)
                for sl in (slice(0, half), slice(half, 2 * half))]
      shift = np.asarray(shift_of(x_t, t, labels, jnp.float32(beta))).reshape(n, -1)
      mc_norm, est_norm = np.linalg.norm(mc, axis=1), np.linalg.norm(shift, axis=1)
      num, den = np.sum(shift * mc, 1).reshape(4, -1), np.sum(halves[0] * halves[1], 1).reshape(4, -1)
      boot_den = den[:, boot].sum(-1)                                    # [4, 200]
      # The reference resolves |T|^2 in a bin when 95% of the bootstrap denominators are > 0;
      # otherwise the ratio is not reported (None): the chains cannot see the shift there.
      resolved = np.quantile(boot_den, 0.05, axis=1) > 0
      boot_ratio = num[:, boot].sum(-1) / np.where(boot_den > 0, boot_den, np.nan)
      rows[f"{float(beta):g}"] = {
          "shift_norm": per(est_norm).tolist(), "mc_shift_norm": per(mc_norm).tolist(),
          "projection_ratio": [r if ok else None for r, ok in zip(
              ratio(np.sum(shift * mc, 1), np.sum(halves[0] * halves[1], 1)), resolved)],
          "projection_ratio_sd": [float(np.nanstd(b)) if ok else None for b, ok in zip(boot_ratio, resolved)],
          "rel_error": ratio(np.linalg.norm(shift - mc, axis=1), mc_norm),
          "cosine": per(np.sum(shift * mc, 1) / np.maximum(est_norm * mc_norm, 1e-12)).tolist(),
          # mean |T_a - T_b| / mean |T| for halves a, b: the scale of the reference's own error
          "mc_half_split": ratio(np.linalg.norm(halves[0] - halves[1], axis=1), mc_norm)}
  return out
