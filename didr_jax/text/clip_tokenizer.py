"""CLIP tokenisation with transformers' ``CLIPTokenizer`` from a folder's local files.

SD/SDXL model folders ship ``tokenizer/`` and ``tokenizer_2/`` with ``vocab.json`` and
``merges.txt``; reward checkpoints often do not, so :func:`write_clip_tokenizer_files` builds such a
folder from the OpenAI BPE file that ships inside the ``open_clip_torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``). Ids come back as int32 numpy arrays, padded to 77,
ready to be fed to a jitted text tower.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import numpy as np

REQUIRED_FILES = ("vocab.json", "merges.txt")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class TokenizerFilesError(FileNotFoundError):
  """A tokenizer folder lacks a file the tokenizer needs."""


def _bytes_to_unicode() -> list[str]:
  """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
      + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_clip_tokenizer_files(bpe_gz: str, folder: str, *, pad_token: str = EOS,
                               max_length: int = 77) -> str:
  """Write vocab.json / merges.txt / tokenizer_config.json for the OpenAI CLIP BPE vocabulary.

  ``pad_token``: ``<|endoftext|>`` (SD/SDXL ``tokenizer``) or ``"!"`` (SDXL ``tokenizer_2``;
  OpenCLIP pads with id 0, which is ``"!"``). Returns ``folder``.
  """
  if not os.path.isfile(bpe_gz):
    raise TokenizerFilesError(f"{bpe_gz}: BPE vocabulary file not found")
  with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = lines[1:49152 - 256 - 2 + 1]
  if len(merges) != 48894:
    raise ValueError(f"{bpe_gz}: expected 48894 merges, found {len(merges)}")
  units = _bytes_to_unicode()
  vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [BOS, EOS]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
               "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token,
               "do_lower_case": True}, f, indent=1)
  return folder


class PaddedTokenizer:
  """Strings -> int32 ids [B, max_length] through a transformers tokenizer (truncate, pad)."""

  def __init__(self, hf_tokenizer, max_length: int):
    self.hf = hf_tokenizer
    self.max_length = max_length
    self.pad_token_id = hf_tokenizer.pad_token_id
    self.eos_token_id = hf_tokenizer.eos_token_id
    self.bos_token_id = hf_tokenizer.bos_token_id

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
      raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts][:4]}")
    out = self.hf(list(prompts), padding="max_length", truncation=True,
                  max_length=self.max_length, return_tensors="np")
    return np.asarray(out["input_ids"], dtype=np.int32)


class CLIPTokenizer(PaddedTokenizer):
  """BOS ... EOS, truncated to 77 and padded with the folder's pad token."""

  def __init__(self, hf_tokenizer, max_length: int = 77):
    super().__init__(hf_tokenizer, max_length)


def load_clip_tokenizer(folder: str, *, max_length: int = 77, pad_token: str | None = None) -> CLIPTokenizer:
  """transformers' CLIPTokenizer from ``folder`` (local files only)."""
  if not os.path.isdir(folder):
    raise TokenizerFilesError(f"{folder}: tokenizer folder not found")
  missing = [n for n in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, n))]
  if missing:
    raise TokenizerFilesError(
        f"{folder}: tokenizer file(s) {missing} missing (a CLIP tokenizer needs {REQUIRED_FILES}; "
        "build them with didr_jax.text.write_clip_tokenizer_files from open_clip's "
        "bpe_simple_vocab_16e6.txt.gz)")
  from transformers import CLIPTokenizer as HFCLIPTokenizer  # lazy: transformers is heavy
  kw = {} if pad_token is None else {"pad_token": pad_token}
  hf = HFCLIPTokenizer.from_pretrained(folder, local_files_only=True, **kw)
  if hf.pad_token_id is None:
    raise TokenizerFilesError(f"{folder}: tokenizer has no pad token; pass pad_token=")
  return CLIPTokenizer(hf, max_length=max_length)
