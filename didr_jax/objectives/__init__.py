"""DI-family objectives: TA denoising score matching and the DI / DI++ / DI* / DIDR generator losses."""
from didr_jax.objectives.generator import (
    METHODS, ObjectiveConfig, diffused_reward_shift, generator_loss, method_and_drs)
from didr_jax.objectives.drs import (
    GaussianMixture, drp_denoise, drp_estimate, gauss_hermite_log_mgf, gaussian_linear_drs,
    mixture_drs, step_log_mgf)
from didr_jax.objectives.posterior_drs import snis_correction, variance_table
from didr_jax.objectives.ta import dsm_loss
