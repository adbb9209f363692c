"""Score sampled images as the papers do: ``python -m didr_jax.evaluate`` (per-image scores with each
metric's official preprocessing, FID, diversity, protocol tables) and
``python -m didr_jax.evaluate.compare`` (several evaluations side by side, with a Pareto plot)."""
