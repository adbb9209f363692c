"""Training data: prompt files and the deterministic, resumable, per-process prompt sampler."""
from didr_jax.data.prompts import FORMATS, PromptDataError, PromptSampler, load_prompts
