"""didr_jax: Diff-Instruct with Diffused Reward (and DI, DI++, DI*) in JAX."""
