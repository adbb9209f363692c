"""DI-family objectives: TA denoising score matching and the DI / DI++ / DI* / DIDR generator losses."""
from didr_jax.objectives.generator import METHODS, ObjectiveConfig, generator_loss
from didr_jax.objectives.drs import (
    GaussianMixture, drp_denoise, drp_estimate, gaussian_linear_drs, mixture_drs)
from didr_jax.objectives.ta import dsm_loss
