"""The digits experiment: DIDR vs DI++ vs DI* (and DI) on scikit-learn's 8x8 handwritten digits,
with the project's UNet, CFG, a learned classifier reward and a held-out classifier, on a CPU.

  python -m didr_jax.main --config=configs/digits.py             # the full sweep (< 30 min, 2 cores)
  python -m didr_jax.main --config=configs/digits.py:fast        # CI: default scale of each method
  python -m didr_jax.main --config=configs/digits.py '--config.sweep.didr_betas=(0.25,0.5)'
"""
from ml_collections import config_dict


def _optimizer(lr, weight_decay=0.0, name="adam", warmup_steps=0):
  return config_dict.ConfigDict(dict(name=name, lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=weight_decay, grad_clip=-1.0,
                                     warmup_steps=warmup_steps, mu_dtype="float32"))


def _classifier(kind, width, feature_dim, seed, steps, label_smoothing):
  return config_dict.ConfigDict(dict(kind=kind, width=width, feature_dim=feature_dim, seed=seed,
                                     steps=steps, batch=128, label_smoothing=label_smoothing,
                                     optimizer=_optimizer(2e-3, 1e-4, name="adamw")))


def get_config(arg: str = ""):
  variant = arg or "full"
  if variant not in ("full", "fast"):
    raise ValueError(f"configs/digits.py: variant {variant!r} unknown; use '' (full) or 'fast'")
  c = config_dict.ConfigDict()
  c.experiment = "digits"
  c.variant = variant
  c.seed = 0

  # 8x8 native: a 2-level UNet (8 -> 4) already has cross-attention at both levels; 16x16 costs
  # 4x the FLOPs per step for the same images, which the 2-core budget cannot afford.
  c.data = config_dict.ConfigDict(dict(test_fraction=0.3, resolution=8))
  c.schedule = config_dict.ConfigDict(dict(kind="discrete_vp", betas="linear", beta_start=1e-4,
                                           beta_end=0.02, num_train_timesteps=1000))
  c.unet = config_dict.ConfigDict(dict(width=16, layers_per_block=1, heads=(2, 4),
                                       cross_attention_dim=32, label_tokens=4, norm_groups=8,
                                       mid_block=True))

  c.classifiers = config_dict.ConfigDict()
  # Rewards: log p(label | x). Label smoothing 0.1 keeps them off the log p = 0 ceiling for good
  # digits (plain cross-entropy drives the train loss to 1e-5 and every sample to reward 0).
  c.classifiers.reward = _classifier("cnn", 32, 64, 101, 1000, 0.1)     # training reward
  c.classifiers.heldout = _classifier("mlp", 128, 64, 202, 1000, 0.1)   # held-out reward, never trained on
  c.classifiers.features = _classifier("cnn", 24, 16, 303, 1000, 0.0)   # FD / precision-recall features

  c.reference = config_dict.ConfigDict(dict(steps=2400, batch=64, label_dropout=0.1))
  c.reference.optimizer = _optimizer(1e-3, warmup_steps=200)
  c.generator = config_dict.ConfigDict(dict(label_t=400))
  c.distill = config_dict.ConfigDict(dict(steps=800, batch=64, ddim_steps=20, pool_size=2048))
  c.distill.optimizer = _optimizer(3e-4)

  c.align = config_dict.ConfigDict()
  c.align.steps = 200
  c.align.batch = 32
  c.align.k_ta = 2
  c.align.ta_warmup_steps = 100
  c.align.ta_t_range = (0, 999)
  c.align.gen_t_range = (20, 980)
  c.align.ta_optimizer = _optimizer(3e-4)
  c.align.gen_optimizer = _optimizer(1e-4)

  c.objective = config_dict.ConfigDict()
  c.objective.weighting = "dmd2"
  c.objective.cfg_w = 0.5            # augmented CFG of the reference (diffusers guidance 1.5)
  c.objective.drp_k = 2
  c.objective.drp_t_max = -1.0
  # objective.drs is set per run by sweep.didr_estimators; the estimators' settings are these.
  c.objective.snis_k = 2            # [choice] the t2i configs' snis settings
  c.objective.snis_m = 4
  c.objective.snis_variance = "local"
  c.objective.snis_var_max = 1.0      # pixels in [-1, 1]: no posterior variance exceeds 1
  c.objective.snis_rows = 0
  c.objective.snis_chunk = 0
  c.objective.hybrid_snr = 0.66
  c.objective.distar_c = 1.0
  c.objective.cfg_placement = "in"

  c.sweep = config_dict.ConfigDict()
  # DI++ / DI* alpha_rew and DIDR 1 / beta span the same nominal reward strengths 1, 10, 100
  c.sweep.dipp_scales = (1.0, 10.0, 100.0)       # alpha_rew
  c.sweep.distar_scales = (1.0, 10.0, 100.0)     # alpha_rew
  c.sweep.didr_betas = (1.0, 0.1, 0.01)          # beta
  # DRS estimators (objective.drs values), the first is the default: the trainer's default (snis),
  # the paper's DRP (K = objective.drp_k) and the hybrid.
  c.sweep.didr_estimators = ("snis", "drp", "hybrid")
  c.sweep.default_dipp = 10.0
  c.sweep.default_distar = 10.0
  c.sweep.default_didr = 0.1

  # The reference is evaluated with the distillation's sampler (distill.ddim_steps guided DDIM steps).
  # bootstrap: replicates of the paired-bootstrap DIDR-vs-DI++/DI* differences in results.md
  c.eval = config_dict.ConfigDict(dict(seed=1000, knn_k=3, off_manifold_quantile=0.99, grid_per_class=10,
                                       bootstrap=200))
  # DRP vs a posterior-sample (jackknifed SNIS) reference of the DRS per t-bin: states per bin
  # (0: off), chains per state, ancestral steps per chain (didr_jax/digits/drs_check.py)
  c.eval.drs_check_states = 16
  c.eval.drs_check_chains = 64
  c.eval.drs_check_steps = 20
  c.mesh = config_dict.ConfigDict(dict(shape=(-1, 1, 1), rules="replicated"))
  # Every phase runs one (unrolled) step per chunk: see didr_jax/digits/stepping.py.
  # parallel_runs: sweep runs (and the DRS check) in that many threads of this process; each keeps
  # about one core busy and compiles single-threaded (didr_jax/digits/experiment.py)
  c.train = config_dict.ConfigDict(dict(log_every_chunks=50, parallel_runs=2))
  c.checkpoint = config_dict.ConfigDict(dict(every_steps=100, keep=1, async_save=True))

  if variant == "fast":   # CI: every phase and the default run of each method, a few minutes
    for name in ("reward", "heldout", "features"):
      c.classifiers[name].steps = 300
    c.reference.steps = 1000
    c.distill.steps = 150
    c.distill.pool_size = 512
    c.distill.ddim_steps = 10
    c.align.steps = 20
    c.align.k_ta = 1
    c.align.ta_warmup_steps = 10
    c.sweep.dipp_scales = (c.sweep.default_dipp,)
    c.sweep.distar_scales = (c.sweep.default_distar,)
    c.sweep.didr_betas = (c.sweep.default_didr,)
    c.sweep.didr_estimators = c.sweep.didr_estimators[:1]
    c.eval.drs_check_states = 0
    c.train.log_every_chunks = 10
    c.checkpoint.every_steps = 100
  return c
