"""Diffusion math: schedules, parameterisation conversions, DDIM, classifier-free guidance."""
from didr_jax.diffusion.schedules import Schedule, make_schedule
from didr_jax.diffusion.sampling import ddim_sample
from didr_jax.diffusion.parameterization import (
    PREDICTIONS, at_least_f32, broadcast_to, cfg, ddim_step, from_denoiser, score, to_denoiser)
