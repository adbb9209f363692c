"""T5 tokenisation of prompts as PixArt-alpha's pipeline does it, from a folder's local files.

diffusers' ``PixArtAlphaPipeline.encode_prompt``: ``_text_preprocessing`` (``lower().strip()``
when ``clean_caption`` is off, or when bs4/ftfy are missing), then the T5 tokenizer with
``padding="max_length", max_length=120, truncation=True, add_special_tokens=True`` (``</s>`` ends
every prompt, truncated ones too); the attention mask goes to the text encoder. The pipeline's
``clean_caption=True`` regex cleaner (its ``__call__`` default) is not ported.

transformers' ``T5Tokenizer`` is tokenizers-backed: it reads ``tokenizer.json`` directly and needs
the ``sentencepiece`` package only to convert a bare ``spiece.model``; without either we refuse
rather than guess a vocabulary. No torch is imported.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import numpy as np

from didr_jax.text.clip_tokenizer import TokenizerFilesError

PIXART_MAX_LENGTH = 120
FAST_FILE, SPM_FILE = "tokenizer.json", "spiece.model"


class T5PromptTokenizer:
  """Strings -> (input_ids, attention_mask), both int32 [B, max_length], padded with ``<pad>``."""

  def __init__(self, hf_tokenizer, max_length: int = PIXART_MAX_LENGTH, preprocess: bool = True):
    self.hf, self.max_length, self.preprocess = hf_tokenizer, max_length, preprocess
    self.pad_token_id = hf_tokenizer.pad_token_id
    self.eos_token_id = hf_tokenizer.eos_token_id

  def lengths(self, prompts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts, ``</s>`` included (``max_length`` keeps the first ones)."""
    texts = [p.lower().strip() for p in prompts] if self.preprocess else list(prompts)
    out = self.hf(texts, add_special_tokens=True, truncation=False)
    return np.asarray([len(ids) for ids in out["input_ids"]], np.int64)

  def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts][:4]}")
    if self.preprocess:  # PixArt's _text_preprocessing(clean_caption=False)
      prompts = [p.lower().strip() for p in prompts]
    out = self.hf(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    return (np.asarray(out["input_ids"], dtype=np.int32),
            np.asarray(out["attention_mask"], dtype=np.int32))


def _have_sentencepiece() -> bool:
  return importlib.util.find_spec("sentencepiece") is not None


def load_t5_tokenizer(folder: str, *, max_length: int = PIXART_MAX_LENGTH,
                      preprocess: bool = True) -> T5PromptTokenizer:
  """transformers' ``T5Tokenizer`` from ``folder`` (local files only), wrapped for PixArt."""
  if not os.path.isdir(folder):
    raise TokenizerFilesError(f"{folder}: tokenizer folder not found")
  has_fast = os.path.isfile(os.path.join(folder, FAST_FILE))
  if not has_fast and not os.path.isfile(os.path.join(folder, SPM_FILE)):
    raise TokenizerFilesError(f"{folder}: neither {FAST_FILE!r} nor {SPM_FILE!r} found (a T5 "
                              "tokenizer needs one of them)")
  if not has_fast and not _have_sentencepiece():
    raise ImportError(f"{folder}: only {SPM_FILE!r} is present and the 'sentencepiece' package is "
                      f"not installed; install it, or write {FAST_FILE!r} once where it is "
                      "(T5Tokenizer.from_pretrained(folder).save_pretrained(folder))")
  from transformers import T5Tokenizer  # lazy: transformers is heavy
  hf = T5Tokenizer.from_pretrained(folder, local_files_only=True)
  if hf.pad_token_id is None or hf.eos_token_id is None:
    raise TokenizerFilesError(f"{folder}: tokenizer has no pad or eos token (T5 pads with <pad> "
                              "and ends prompts with </s>)")
  return T5PromptTokenizer(hf, max_length=max_length, preprocess=preprocess)
