"""Tokenisers loaded from local files only (no hub access)."""
from didr_jax.text.clip_tokenizer import (
    CLIPTokenizer, TokenizerFilesError, load_clip_tokenizer, write_clip_tokenizer_files)
