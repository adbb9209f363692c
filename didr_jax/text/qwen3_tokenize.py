"""Z-Image prompt tokenisation for the Qwen3 text encoder, from a folder's local files.

diffusers' ``ZImagePipeline._encode_prompt`` wraps each prompt as one user message, renders it
with the tokenizer's chat template (``add_generation_prompt=True, enable_thinking=True``, which
for Qwen3's template gives ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``),
then tokenises with ``padding="max_length", max_length=512, truncation=True`` and keeps the
attention mask: the encoder's ``hidden_states[-2]`` is read at the mask's real tokens only. We do
exactly that with transformers' tokenizer class (``Qwen2Tokenizer``, tokenizers-backed; it imports
no torch); the folder's own chat template is rendered, never a copy of it.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from didr_jax.text.clip_tokenizer import TokenizerFilesError

QWEN3_MAX_LENGTH = 512   # the pipeline's max_sequence_length default
REQUIRED_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


class Qwen3PromptTokenizer:
  """Prompts -> (ids int32 [B, max_length], attention_mask int32 [B, max_length])."""

  def __init__(self, hf_tokenizer, max_length: int = QWEN3_MAX_LENGTH):
    self.hf = hf_tokenizer
    self.max_length = max_length
    self.pad_token_id = hf_tokenizer.pad_token_id

  def chat_text(self, prompt: str) -> str:
    """The prompt as the pipeline renders it (one user turn, generation prompt, thinking on)."""
    return self.hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=True)

  def lengths(self, prompts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts of the rendered prompts (``max_length`` keeps the first ones)."""
    out = self.hf([self.chat_text(p) for p in prompts], truncation=False)
    return np.asarray([len(ids) for ids in out["input_ids"]], np.int64)

  def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, str):
      prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts][:4]}")
    out = self.hf([self.chat_text(p) for p in prompts], padding="max_length",
                  max_length=self.max_length, truncation=True, return_tensors="np")
    return (np.asarray(out["input_ids"], dtype=np.int32),
            np.asarray(out["attention_mask"], dtype=np.int32))


def load_qwen3_tokenizer(folder: str, *, max_length: int = QWEN3_MAX_LENGTH) -> Qwen3PromptTokenizer:
  """transformers' Qwen2Tokenizer from ``folder`` (e.g. Z-Image's ``tokenizer/``; local files only)."""
  if not os.path.isdir(folder):
    raise TokenizerFilesError(f"{folder}: tokenizer folder not found")
  missing = [n for n in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, n))]
  if missing:
    raise TokenizerFilesError(f"{folder}: tokenizer file(s) {missing} missing (a Qwen3 tokenizer "
                              f"needs {REQUIRED_FILES})")
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    cls_name = json.load(f).get("tokenizer_class")
  if cls_name not in TOKENIZER_CLASSES:
    raise ValueError(f"{folder}/tokenizer_config.json field 'tokenizer_class': {cls_name!r} is not "
                     f"a Qwen tokenizer ({TOKENIZER_CLASSES})")
  from transformers import Qwen2TokenizerFast  # lazy: transformers is heavy (no torch import)
  hf = Qwen2TokenizerFast.from_pretrained(folder, local_files_only=True)
  if not hf.chat_template:
    raise TokenizerFilesError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json "
                              "'chat_template' or chat_template.jinja); Z-Image renders prompts "
                              "with it")
  if hf.pad_token_id is None:
    raise TokenizerFilesError(f"{folder}: tokenizer_config.json has no pad_token")
  return Qwen3PromptTokenizer(hf, max_length)
