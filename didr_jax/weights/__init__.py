"""Reading, mapping and writing pretrained weights (safetensors only; no torch, no pickles)."""
from didr_jax.weights.safetensors_io import (
    WeightFileError, read_safetensors, read_weights_folder, write_safetensors)
from didr_jax.weights.mapping import (
    Rule, WeightMismatchError, TRANSFORMS, flat_state, load_state, export_state)
