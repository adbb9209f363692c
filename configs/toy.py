"""The DIDR paper's toy experiment (docs/method.md section 5), the embedded default main job.

  python -m didr_jax.main --config=configs/toy.py              # the paper's recipe (default)
  python -m didr_jax.main --config=configs/toy.py:fast         # reduced, for tests and CI
  python -m didr_jax.main --config=configs/toy.py --config.toy.beta=0.25 \
      '--config.methods=("didr-exact","dipp")' --workdir=runs/beta025
"""
from ml_collections import config_dict


def _optimizer(lr):
  return config_dict.ConfigDict(dict(name="adam", lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.0, grad_clip=-1.0, warmup_steps=0,
                                     mu_dtype="float32"))


def get_config(arg: str = ""):
  variant = arg or "paper"
  if variant not in ("paper", "fast"):
    raise ValueError(f"configs/toy.py: variant {variant!r} unknown; use '' (paper) or 'fast'")
  c = config_dict.ConfigDict()
  c.experiment = "toy"
  c.variant = variant
  c.seed = 0
  # Method names as in every experiment: di, dipp, distar, didr (DIDR with objective.drs, the
  # shipped snis) and didr-<estimator> for another DRS estimator: didr-exact (the analytic DRS),
  # didr-drp (the paper's DRP); didr-hybrid (K=1 DRP at high SNR, snis below) is available by name,
  # its DRP part is pointwise wrong (docs/method.md 4).
  c.methods = ("di", "dipp", "didr-exact", "didr-drp", "didr", "distar")

  c.toy = config_dict.ConfigDict()
  c.toy.means = ((-2.0,), (2.0,))   # one tuple per mode; its length is the dimension (1 or 2)
  c.toy.stds = (0.5, 0.5)
  c.toy.weights = (0.5, 0.5)
  c.toy.reward = "sigmoid"          # sigmoid: r(x) = sigmoid(x[0] / tau); step: r(x) = 1[x[0] > 0]
  c.toy.tau = 0.25
  c.toy.beta = 0.5                  # p* ~ q0 exp(r / beta)

  c.schedule = config_dict.ConfigDict(dict(kind="continuous_vp", betas="linear",
                                           beta_min=0.1, beta_max=20.0))
  # [choice] width 32: the paper gives no networks; 32 fits every method in the 10-minute budget
  c.network = config_dict.ConfigDict(dict(width=32, depth=3, time_dim=16))
  # [choice] kind: "monotone" (1-D: positive-weight tanh layers, increasing in z) or "mlp" (SiLU MLP,
  # any dimension). An MLP folds its map when DIDR moves mass between the modes and misses p*'s
  # negative mode; an increasing map cannot fold (docs/method.md section 5)
  c.generator = config_dict.ConfigDict(dict(kind="monotone", width=32, depth=3))

  c.reference = config_dict.ConfigDict(dict(steps=10_000, batch=2048, t_min=1e-3))
  c.reference.optimizer = _optimizer(3e-4)
  c.distill = config_dict.ConfigDict(dict(steps=3_000, batch=2048, ddim_steps=30, pool_size=131_072))
  c.distill.optimizer = _optimizer(1e-3)

  c.align = config_dict.ConfigDict()
  c.align.steps = 6_000
  c.align.batch = 2048
  c.align.k_ta = 5
  c.align.ta_t_range = (1e-3, 1.0)
  # [choice] the generator's t-range: every range has the same minimiser, p*; above t = 0.5 (a/s < 0.3)
  # an eps-network's D = (x - s eps)/a amplifies its errors by s/a, and the TA's lag there pushed
  # every sample right (docs/method.md section 5: W1 0.23 -> 0.12). The TA still trains on (1e-3, 1).
  c.align.gen_t_range = (0.02, 0.5)
  c.align.ema_decay = 0.0
  c.align.ta_optimizer = _optimizer(3e-4)
  # [choice] 1e-3: the monotone map moves its steep part by O(1) in z, which Adam's per-step size
  # must cover in 6,000 steps (the paper's MLP used 1e-4)
  c.align.gen_optimizer = _optimizer(1e-3)

  c.objective = config_dict.ConfigDict()
  c.objective.weighting = "plain"
  c.objective.alpha_rew = 1.0 / c.toy.get_ref("beta")   # DI++/DI*: same nominal trade-off as DIDR
  c.objective.drs = "snis"              # the estimator of "didr" (the others: didr-<estimator>)
  c.objective.drp_k = 2
  c.objective.drp_t_max = -1.0        # the paper's DRP, uncut (< 0); a cut-off is no fix (docs/method.md 4)
  c.objective.snis_k = 4              # snis / hybrid: chain steps, samples per row, x0 variance
  c.objective.snis_m = 8
  c.objective.snis_chunk = 0
  # [choice] every row: a quarter of the rows (unbiased, a quarter of the cost) left p*'s negative mode
  # 0.13 too wide (docs/method.md section 5)
  c.objective.snis_rows = 0
  c.objective.snis_variance = "local"
  c.objective.hybrid_snr = 0.66       # hybrid: K=1 DRP where a^2/s^2 >= this (t <= 0.3 here)
  c.objective.distar_c = 1.0
  c.objective.cfg_placement = "in"
  c.objective.cfg_w = 0.0

  # drp_bias.json: estimators vs the exact DRS per t-bin over bias_t_range (the whole diffusion,
  # not only the generator's t-range)
  c.eval = config_dict.ConfigDict(dict(num_samples=10_000, drp_bias_ks=(1, 2, 4),
                                       drp_bias_samples=4096, t_bins=10, bias_t_range=(0.02, 0.98)))
  c.mesh = config_dict.ConfigDict(dict(shape=(-1, 1, 1), rules="replicated"))
  # parallel_methods: methods aligned side by side in threads (one process only); each keeps about
  # one core busy, so 2 suits this 2-core machine
  c.train = config_dict.ConfigDict(dict(steps_per_chunk=200, log_every_chunks=5, parallel_methods=2))
  c.checkpoint = config_dict.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))

  if variant == "fast":   # minutes on a laptop CPU; DIDR with the exact DRS still reaches p* (tested)
    c.reference.steps = 4_000
    c.reference.batch = 1024
    c.reference.optimizer.lr = 1e-3
    c.distill.steps = 600
    c.distill.batch = 1024
    c.distill.ddim_steps = 20
    c.distill.pool_size = 16_384
    c.align.steps = 3_000
    c.align.batch = 1024
    c.align.gen_optimizer.lr = 2e-3    # 2x the default: 3k instead of 6k steps at half the batch
    c.eval.num_samples = 4_000
    c.eval.drp_bias_samples = 1024
    c.train.steps_per_chunk = 100
    c.train.log_every_chunks = 5
    c.checkpoint.every_steps = 500
  return c
