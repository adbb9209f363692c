"""Model-agnostic functional trainer: TrainState, jitted TA/generator steps, loop, checkpoints."""
