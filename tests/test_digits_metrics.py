"""Digits metrics, Pareto analysis, sweep naming, data split and config validation against
independent references (scipy, hand examples); no training."""
import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist, pdist

from didr_jax.digits import evaluation as ev
from didr_jax.digits import report


def _scipy_fd(mu1, c1, mu2, c2):
  covmean = scipy.linalg.sqrtm(c1 @ c2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean).real)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
  c1, c2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  assert ev.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(_scipy_fd(mu1, c1, mu2, c2), rel=1e-9)
  assert ev.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_one_dimensional_closed_form():
  # FD(N(m1, v1), N(m2, v2)) = (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2
  fd = ev.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
  assert fd == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_features_fd_uses_sample_statistics():
  rng = np.random.default_rng(1)
  f1, f2 = rng.standard_normal((200, 3)), 2.0 + 0.5 * rng.standard_normal((300, 3))
  ref = _scipy_fd(f1.mean(0), np.cov(f1.T), f2.mean(0), np.cov(f2.T))
  assert ev.features_fd(f1, f2) == pytest.approx(ref, rel=1e-9)


def test_precision_recall_hand_example():
  real = np.array([[0.0], [1.0], [2.0], [3.0]])      # k=1 radii: 1, 1, 1, 1
  fake = np.array([[0.5], [10.0]])                     # k=1 radii: 9.5, 9.5
  precision, recall = ev.precision_recall(real, fake, k=1)
  assert precision == 0.5                              # 0.5 is on the real manifold, 10 is not
  assert recall == 1.0                                 # every real point is within 9.5 of 0.5
  precision, recall = ev.precision_recall(real, np.array([[1.5], [1.6]]), k=1)
  assert precision == 1.0 and recall == 0.0            # fake radii 0.1 reach no real point


def test_precision_recall_against_brute_force():
  rng = np.random.default_rng(2)
  real, fake = rng.standard_normal((60, 4)), 0.5 + rng.standard_normal((50, 4))
  k = 3

  def brute(queries, support):
    d = cdist(support, support)
    radii = np.array([sorted(row)[k] for row in d])
    return np.mean([any(np.linalg.norm(q - s) <= r for s, r in zip(support, radii)) for q in queries])
  p, r = ev.precision_recall(real, fake, k)
  assert p == pytest.approx(brute(fake, real)) and r == pytest.approx(brute(real, fake))


def test_diversity_and_off_manifold_against_scipy():
  rng = np.random.default_rng(3)
  feats, labels = rng.standard_normal((40, 3)), np.repeat([0, 1, 2, 3], 10)
  ref = np.mean([pdist(feats[labels == c]).mean() for c in range(4)])
  assert ev.diversity(feats, labels) == pytest.approx(ref, rel=1e-12)
  train = rng.uniform(-1, 1, (30, 8, 8))
  test = rng.uniform(-1, 1, (20, 8, 8))
  thr = ev.off_manifold_threshold(test, train, 0.9)
  nn = cdist(test.reshape(20, -1), train.reshape(30, -1)).min(1)
  assert thr == pytest.approx(np.quantile(nn, 0.9))
  samples = np.concatenate([train[:5], np.full((5, 8, 8), 9.0)])   # 5 copies of train images, 5 far off
  assert ev.off_manifold_mass(samples, train, thr) == 0.5


def test_pareto_hand_example():
  runs = {"a": dict(method="dipp", label="dipp", heldout_reward=-0.5, fd=1.0),
          "b": dict(method="dipp", label="dipp", heldout_reward=-0.2, fd=3.0),
          "c": dict(method="didr", label="didr", heldout_reward=-0.4, fd=0.5),
          "d": dict(method="didr", label="didr", heldout_reward=-0.1, fd=2.0),
          "reference": dict(method="reference", label="reference", heldout_reward=0.0, fd=0.0)}
  p = report.pareto_analysis(runs)
  assert p["dominated_by"] == {"a": ["c"], "b": ["d"], "c": [], "d": []}   # the reference is not compared
  assert p["global_front"] == ["c", "d"]
  assert p["method_fronts"] == {"dipp": ["a", "b"], "didr": ["c", "d"]}
  # b at reward -0.2 on didr's front c(-0.4, 0.5) -- d(-0.1, 2.0): 0.5 + (0.2 / 0.3) * 1.5 = 1.5
  assert p["equal_reward_fd"]["b"]["didr"] == pytest.approx(1.5)
  assert p["equal_reward_fd"]["a"]["didr"] is None                          # outside didr's range


def test_sweep_names_and_defaults():
  from configs.digits import get_config
  from didr_jax.digits.sweep import default_runs, run_specs
  cfg = get_config()
  names = [s.name for s in run_specs(cfg)]
  assert names == ["di", "dipp_1", "dipp_10", "dipp_100", "distar_1", "distar_10", "distar_100",
                   "didr_1", "didr_0.1", "didr_0.01", "didr-drp_1", "didr-drp_0.1", "didr-drp_0.01",
                   "didr-hybrid_1", "didr-hybrid_0.1", "didr-hybrid_0.01"]
  assert default_runs(cfg) == {"di": "di", "dipp": "dipp_10", "distar": "distar_10", "didr": "didr_0.1"}
  specs = {s.name: s for s in run_specs(cfg)}
  assert specs["didr_0.1"].estimator == "snis" and specs["didr-drp_0.1"].estimator == "drp"
  assert specs["didr-drp_0.1"].label == "didr-drp" and specs["didr_0.1"].label == "didr"


def test_estimator_objectives_reach_the_objective_config():
  from configs.digits import get_config
  from didr_jax.digits.sweep import estimator_objective, objective_config
  cfg = get_config()
  assert estimator_objective("drp500") == {"drs": "drp", "drp_t_max": 500.0}
  with pytest.raises(ValueError, match="exact"):
    estimator_objective("exact")            # digits have no analytic prior
  cut, plain = objective_config(cfg, "didr", "drp500"), objective_config(cfg, "didr", "drp")
  assert (cut.drs, cut.drp_t_max, plain.drp_t_max) == ("drp", 500.0, cfg.objective.drp_t_max)
  assert cut.beta == 1.0 and cut.alpha_rew == 1.0 and cut.cfg_w == cfg.objective.cfg_w
  snis = objective_config(cfg, "didr", "snis")
  assert (snis.drs, snis.snis_k, snis.snis_m, snis.snis_variance) == (
      "snis", cfg.objective.snis_k, cfg.objective.snis_m, cfg.objective.snis_variance)
  assert objective_config(cfg, "didr", "hybrid").drs == "hybrid"
  assert objective_config(cfg, "dipp").method == "dipp"


def test_data_split_is_stratified_scaled_and_seeded():
  from didr_jax.digits.data import load_split, to_native
  a, b = load_split(0.3, 0), load_split(0.3, 1)
  assert len(a.train_labels) + len(a.test_labels) == 1797
  assert a.train_images.min() == -1.0 and a.train_images.max() == 1.0
  counts = np.bincount(a.test_labels, minlength=10) / np.bincount(np.concatenate([a.train_labels, a.test_labels]))
  assert np.allclose(counts, 0.3, atol=0.01)
  assert not np.array_equal(a.test_labels, b.test_labels) or not np.array_equal(a.test_images, b.test_images)
  np.testing.assert_array_equal(load_split(0.3, 0).test_images, a.test_images)
  block = np.kron(a.test_images[:2, ..., 0], np.ones((2, 2)))[..., None]   # 16x16 of 2x2 blocks
  np.testing.assert_allclose(np.asarray(to_native(block)), a.test_images[:2], atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("data.resolution", 12), ("data.test_fraction", 0.9), ("classifiers.heldout.kind", "cnn"),
    ("classifiers.heldout.seed", 101), ("sweep.default_dipp", 3.0), ("sweep.didr_betas", (0.5, -1.0)),
    ("sweep.didr_estimators", ("exact",)), ("align.gen_t_range", (20, 2000)), ("objective.drp_k", 0),
    ("unet.heads", (2, 4, 8)), ("reference.label_dropout", 1.0), ("align.batch", 0),
    ("objective.snis_var_max", -1.0), ("objective.snis_m", 1), ("objective.weighting", "dmd3"),
    ("objective.drs", "drp"), ("objective.snis_mm", 4), ("train.parallel_runs", 0),
])
def test_validate_names_the_field(field, value):
  from configs.digits import get_config
  from didr_jax.digits.validate import validate
  from didr_jax.errors import ConfigError
  cfg = get_config("fast")
  group = cfg
  *path, key = field.split(".")
  for k in path:
    group = group[k]
  with cfg.unlocked():
    group[key] = value
  with pytest.raises(ConfigError, match=rf"^config\.{field}: "):
    validate(cfg)


def test_posterior_sample_drs_reference_on_a_gaussian_prior():
  """q0 = N(mu, v0), r(x) = b x: (s^2/a) DRS = s^2 v0 b / (beta (a^2 v0 + s^2)) in closed form; the
  DRS check's reference (the trainer's chain with the local variance, 20 steps, jackknifed) recovers
  it, and its chains have the posterior's variance."""
  import jax
  import jax.numpy as jnp
  from didr_jax.diffusion import Schedule
  from didr_jax.digits.drs_check import snis_shift
  from didr_jax.objectives.posterior_drs import ancestral_chain
  sched = Schedule("continuous_vp")
  mu, v0, b, beta = 0.3, 0.5, 1.5, 0.8

  def denoise(x, t, c):
    a, s = sched.alpha_sigma(t)
    a, s = a[:, None], s[:, None]
    d = mu + a * v0 * (x - a * mu) / (a ** 2 * v0 + s ** 2)
    return d, (x - a * d) / s

  n, m, t = 400, 64, 0.5
  a, s = (float(v) for v in sched.alpha_sigma(t))
  x_t = a * mu + np.sqrt(a ** 2 * v0 + s ** 2) * jax.random.normal(jax.random.PRNGKey(0), (n, 1))
  tt = jnp.full((n * m,), t)
  x0 = ancestral_chain(denoise, sched, jnp.repeat(x_t, m, 0), tt, None,
                       jax.random.split(jax.random.PRNGKey(1), n * m), 20, variance="local")
  v_post = v0 * s ** 2 / (a ** 2 * v0 + s ** 2)
  assert float(jnp.var(x0.reshape(n, m), axis=1, ddof=1).mean()) == pytest.approx(v_post, rel=0.04)
  shift = snis_shift(x0.reshape(n, m, 1), b * x0.reshape(n, m), beta)
  exact = s ** 2 * v0 * b / (beta * (a ** 2 * v0 + s ** 2))
  assert float(jnp.mean(shift)) == pytest.approx(exact, rel=0.05)


def test_paired_bootstrap_of_identical_runs_is_zero_and_of_shifted_runs_is_the_shift():
  rng = np.random.default_rng(4)
  real, f = rng.standard_normal((80, 3)), rng.standard_normal((60, 3))
  logp = -rng.uniform(0, 1, 60)
  same = ev.paired_bootstrap(f, logp, f, logp, real, n_boot=20, seed=0)
  assert same == {"d_fd": 0.0, "sd_fd": 0.0, "d_heldout": 0.0, "sd_heldout": 0.0}
  moved = ev.paired_bootstrap(f, logp + 0.1, f + 1.0, logp, real, n_boot=50, seed=0)
  assert moved["d_heldout"] == pytest.approx(0.1) and moved["sd_heldout"] == pytest.approx(0.0, abs=1e-12)
  assert moved["d_fd"] == pytest.approx(ev.features_fd(f, real) - ev.features_fd(f + 1.0, real))
  assert moved["sd_fd"] > 0
