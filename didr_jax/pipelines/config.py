"""Config groups shared by ``configs/{sdxl,sd15,pixart,zimage}.py`` (docs/method.md section 6).

The real run reads a diffusers folder of the reference, a generator network (folder or
safetensors), a reward and a prompt file; ``tiny`` builds random tiny models in memory (CI on CPU).
Backbone defaults live in ``pipelines.backbones.BACKBONES``.
"""
from __future__ import annotations

from ml_collections import config_dict

from didr_jax.models.lora import default_targets
from didr_jax.pipelines.backbones import BACKBONES


def _optimizer(lr):
  return config_dict.ConfigDict(dict(name="adamw", lr=lr, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=0.01, grad_clip=10.0, warmup_steps=500,
                                     mu_dtype="float32"))


def base_config(backbone: str, variant: str):
  if backbone not in BACKBONES:
    raise ValueError(f"backbone {backbone!r} unknown; choose one of {sorted(BACKBONES)}")
  if variant not in ("run", "tiny"):
    raise ValueError(f"configs/{backbone}.py: variant {variant!r} unknown; use '' (real run) or 'tiny'")
  bb = BACKBONES[backbone]
  b = bb.defaults
  c = config_dict.ConfigDict()
  c.experiment = "t2i"
  c.backbone = backbone
  c.variant = variant
  c.seed = 0
  c.method = "didr"                       # di | dipp | distar | didr

  c.model = config_dict.ConfigDict()
  c.model.reference = ""                  # diffusers folder: unet/ or transformer/, vae/, text_encoder/, tokenizer/ (+ _2 for sdxl)
  c.model.generator = ""                  # network folder (config.json + safetensors) or one .safetensors; "" = the reference's
  c.model.label_t = b["label_t"]          # generator = network(z * input_scale, label_t) read out as x0
  c.model.input_scale = 1.0               # DMD2: unscaled z
  c.model.dtype = "bfloat16"              # UNet activations
  c.model.param_dtype = "float32"         # master weights
  c.model.vae_dtype = "float32"           # SDXL VAE decode in fp32 (overflows in fp16)
  c.model.attention = "xla"
  c.model.remat = "full"                  # per UNet block / DiT layer
  c.model.cache_dir = ""                  # orbax cache of converted weights ("" = off)
  # LoRA (docs/models.md "LoRA adapters"): rank 0 = full fine-tuning; adapters W + (alpha / rank) A B on the
  # linear layers `targets` names (diffusers module names, PEFT style) of the `networks` that train
  c.model.lora = config_dict.ConfigDict(dict(rank=0, alpha=8.0, targets=default_targets(bb.network_class),
                                             networks=("generator", "ta")))
  if bb.flow:
    c.model.time_shift = bb.schedule.shift  # rectified flow: sigma = s t / (1 + (s - 1) t)

  c.reward = config_dict.ConfigDict()
  c.reward.name = "pickscore"             # see didr_jax.rewards.REWARD_NAMES
  c.reward.path = ""
  c.reward.clip = ""                      # aesthetic: the CLIP ViT-L/14
  c.reward.tokenizer = ""                 # hpsv2 / clipscore: a CLIP tokenizer folder
  c.reward.clip_config = ""               # OpenCLIP config name for OpenCLIP-naming files

  c.data = config_dict.ConfigDict()
  c.data.prompts = ""                     # txt / jsonl / Parti TSV / COCO json
  c.data.format = "auto"
  c.data.field = "prompt"
  c.data.resolution = b["resolution"]     # image side (latent side = resolution / 8)
  c.data.shuffle = True
  c.data.precompute_embeddings = False    # encode the whole prompt set once (host memory: ~0.3 MiB/prompt for SDXL)

  c.objective = config_dict.ConfigDict()
  c.objective.weighting = "dmd2"
  c.objective.alpha_rew = 100.0           # DI++ / DI* (SDXL)
  c.objective.beta = 0.01                 # DIDR KL strength (sweep)
  c.objective.drs = "snis"                # DIDR DRS estimator: snis | hybrid | drp (docs/method.md 4)
  c.objective.drp_k = 2                   # drp: DDIM steps
  c.objective.drp_t_max = -1.0            # drp: term only for t <= t_max (< 0: everywhere)
  c.objective.snis_k = 2                  # snis: chain steps (1 + (K-1) M guided reference calls per row)
  c.objective.snis_m = 4                  # snis: posterior samples per row (M VAE decodes + rewards)
  c.objective.snis_chunk = 0              # snis: samples per row run at once (0: all M)
  c.objective.snis_rows = 0               # snis: rows per batch that get the estimate (0: all)
  c.objective.snis_variance = "local"     # snis chains' x0 variance: local (JVP) | table | none
  c.objective.snis_var_max = 1.0          # snis: x0 variance bound [choice: scaled latents have unit variance]
  c.objective.hybrid_snr = 0.66           # hybrid: K=1 DRP where a^2/s^2 >= 0.66 (timestep <= ~418)
  c.objective.distar_c = 1.0
  c.objective.cfg_placement = "in"
  c.objective.cfg_w = b["cfg_w"]          # augmented: out_c + w (out_c - out_u) = diffusers 1 + w

  c.align = config_dict.ConfigDict()
  c.align.steps = 20_000
  c.align.batch = 64                      # global
  c.align.k_ta = 5
  c.align.fresh_ta_prompts = True         # each TA update its own prompt batch, as DMD2 (False: the step's)
  c.align.ta_warmup_steps = 300           # first outer steps: TA updates only (catch up with a distilled generator)
  c.align.grad_accum = 1                  # microbatches per update (same gradient, less activation memory)
  c.align.ta_t_range = b["ta_t_range"]    # in the schedule's t: timesteps (VP), [0, 1] (flow)
  c.align.gen_t_range = b["gen_t_range"]
  c.align.ema_decay = 0.999
  c.align.gen_optimizer = _optimizer(1e-6)
  c.align.ta_optimizer = _optimizer(2e-6)
  c.align.max_bad_steps = 20              # consecutive non-finite updates before stopping

  c.eval = config_dict.ConfigDict()
  c.eval.prompts = ("a photo of a cat wearing a hat", "a watercolor painting of a lighthouse",
                    "an astronaut riding a horse on the moon", "a bowl of ramen, studio lighting")
  c.eval.seed = 1234
  c.eval.every_chunks = 50               # grid PNG + held-out reward
  c.eval.export_ema = True

  c.mesh = config_dict.ConfigDict(dict(shape=(1, -1, 1), rules="fsdp"))
  c.train = config_dict.ConfigDict(dict(steps_per_chunk=10, log_every_chunks=1))
  c.checkpoint = config_dict.ConfigDict(dict(every_steps=500, keep=3, async_save=True))

  c.tiny = config_dict.ConfigDict(dict(width=16, vae_width=8, prompts=(
      "a red cube", "a blue sphere on grass", "a cat in the snow", "a city at night",
      "an old map", "a bowl of fruit", "a sailing boat", "a mountain lake", "a green bird",
      "a yellow car", "a wooden chair", "a portrait of a dog")))
  if variant == "tiny":
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.resolution = 16                # 4x4 latents through the tiny 4x VAE
    c.reward.name = "tiny_pickscore"
    c.objective.alpha_rew = 1.0
    c.objective.beta = 1.0
    c.objective.snis_variance = "table"   # CI: no JVP through the UNet (compile time); real runs: local
    c.objective.snis_m = 2
    c.align.steps = 3
    c.align.batch = 8
    c.align.k_ta = 2
    c.align.ta_warmup_steps = 0
    c.align.gen_optimizer = _optimizer(1e-4)
    c.align.ta_optimizer = _optimizer(1e-4)
    c.align.gen_optimizer.warmup_steps = 0
    c.align.ta_optimizer.warmup_steps = 0
    c.align.max_bad_steps = 3
    c.eval.every_chunks = 3
    c.train.steps_per_chunk = 1
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
  return c
