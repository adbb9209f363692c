"""Tokenisers loaded from local files only (no hub access)."""
from didr_jax.text.clip_tokenizer import (
    CLIPTokenizer, TokenizerFilesError, load_clip_tokenizer, write_clip_tokenizer_files)
from didr_jax.text.bert_tokenizer import BertTokenizer, load_bert_tokenizer

__all__ = ["CLIPTokenizer", "BertTokenizer", "TokenizerFilesError", "load_clip_tokenizer",
           "load_bert_tokenizer", "write_clip_tokenizer_files"]
