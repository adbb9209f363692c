"""The backbones the t2i trainer runs, as data: what differs between an SDXL or SD1.5 UNet, a
PixArt-alpha DiT and Z-Image. Objectives, steps, checkpoints and exports are shared.

For each: the diffusers class and folder of the denoiser, the text conditioning
(``conditioning.TEXT``), the forward process and what the network predicts on it, the latent
channels, and the config defaults. ``network_apply`` turns a network into the trainer's
``(params, x_t, t, cond) -> output`` with t in the schedule's own domain (timesteps 0..999 on the
discrete VP schedules, t in [0, 1] on the rectified flow).
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from didr_jax.diffusion import Schedule


@dataclasses.dataclass(frozen=True)
class Backbone:
  name: str
  network_class: str      # diffusers ``_class_name`` of the denoiser
  network_folder: str     # its folder in a diffusers pipeline, and the export's name
  text: str               # conditioning.TEXT key
  towers: tuple           # ((text encoder folder, tokenizer folder), ...)
  schedule: Schedule
  prediction: str         # diffusion.to_denoiser's reading of the network output
  latent_channels: int
  defaults: dict          # config defaults (pipelines.config.base_config)
  # the pipeline's guidance g as our augmented w (out_c + w (out_c - out_u)): diffusers' SD/PixArt
  # pipelines mix out_u + g (out_c - out_u), so w = g - 1; Z-Image's mixes pos + g (pos - neg), w = g
  guidance_offset: float = 1.0

  @property
  def flow(self) -> bool:
    return self.schedule.kind == "rectified_flow"

  def make_schedule(self, cfg) -> Schedule:
    """The run's schedule: the backbone's, with the config's time shift on flow backbones."""
    if self.flow:
      return dataclasses.replace(self.schedule, shift=float(cfg.model.time_shift))
    return self.schedule


VP_RANGES = dict(ta_t_range=(0, 999), gen_t_range=(20, 980))
# flow: t in [0, 1]; the ends are excluded where a (t = 1) or s (t = 0) vanish [choice: the
# discrete ranges' 2% margins]
FLOW_RANGES = dict(ta_t_range=(0.001, 0.999), gen_t_range=(0.02, 0.98))

BACKBONES = {
    # label_t: the one-step generator's time (docs/method.md section 6); cfg_w augmented:
    # 7.5 for SDXL (DI*, DMD2); SD1.5: DMD2's guidance 1.75 = 1 + 0.75; PixArt: DI++'s 4.5 = 1 + 3.5
    "sdxl": Backbone("sdxl", "UNet2DConditionModel", "unet", "clip_sdxl",
                     (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
                     Schedule("discrete_vp", betas="scaled_linear"), "eps", 4,
                     dict(label_t=399, resolution=1024, cfg_w=7.5, sample_guidance=5.0, **VP_RANGES)),
    "sd15": Backbone("sd15", "UNet2DConditionModel", "unet", "clip_sd15",
                     (("text_encoder", "tokenizer"),),
                     Schedule("discrete_vp", betas="scaled_linear"), "eps", 4,
                     dict(label_t=999, resolution=512, cfg_w=0.75, sample_guidance=7.5, **VP_RANGES)),
    # PixArt-alpha's scheduler: linear betas 1e-4..0.02; the transformer's first 4 of 8 output
    # channels are eps (the rest its learned variance). label_t 999 [choice: pure noise, as SD1.5]
    "pixart": Backbone("pixart", "PixArtTransformer2DModel", "transformer", "t5",
                       (("text_encoder", "tokenizer"),),
                       Schedule("discrete_vp", betas="linear", beta_start=1e-4, beta_end=0.02), "eps", 4,
                       dict(label_t=999, resolution=512, cfg_w=3.5, sample_guidance=4.5, **VP_RANGES)),
    # Z-Image: flow matching, the transformer predicts x0 - eps at 1 - sigma (models.zimage.
    # flow_velocity); the generator starts at sigma = 1 [choice: Turbo's first step];
    # cfg_w 4 [choice: the model card's 3-5]; time shift 3.0 (Turbo's scheduler), config field
    "zimage": Backbone("zimage", "ZImageTransformer2DModel", "transformer", "qwen3",
                       (("text_encoder", "tokenizer"),),
                       Schedule("rectified_flow", shift=3.0), "flow", 16,
                       dict(label_t=1.0, resolution=1024, cfg_w=4.0, sample_guidance=4.0, **FLOW_RANGES),
                       guidance_offset=0.0),
}


def get(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"backbone {name!r} unknown; choose one of {sorted(BACKBONES)}")
  return BACKBONES[name]


def network_apply(backbone: Backbone, graph, schedule: Schedule):
  """(params, x, t, cond) -> the network's output (``backbone.prediction``) for the trainer."""
  name, channels = backbone.name, backbone.latent_channels
  if name in ("sdxl", "sd15"):
    def apply(p, x, t, c):
      unet = nnx.merge(graph, p)
      extra = dict(text_embeds=c["pooled"], time_ids=c["time_ids"]) if name == "sdxl" else {}
      return unet(x.astype(unet.dtype), t, c["context"], **extra)
  elif name == "pixart":
    def apply(p, x, t, c):
      net = nnx.merge(graph, p)
      added = ({"resolution": c["resolution"], "aspect_ratio": c["aspect_ratio"]}
               if net.config.additional_conditions else None)
      return net(x.astype(net.dtype), t, c["context"], c["mask"], added)[..., :channels]
  elif name == "zimage":
    from didr_jax.models.zimage import flow_velocity

    def apply(p, x, t, c):
      net = nnx.merge(graph, p)
      sigma = schedule.alpha_sigma(t)[1]
      return flow_velocity(net, x.astype(net.dtype), sigma, c["context"], c["mask"])
  else:
    raise ValueError(f"backbone {name!r} has no network apply")
  return apply
