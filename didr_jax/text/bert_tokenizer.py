"""BERT (bert-base-uncased) tokenisation for ImageReward, from a local ``vocab.txt``.

ImageReward tokenises with BLIP's BertTokenizer: lower-cased WordPiece, ``[CLS] ... [SEP]``,
truncated and padded with ``[PAD]`` (id 0) to 35 tokens. BLIP adds ``[DEC]`` / ``[ENC]`` after the
30,522 base ids; scoring never uses them, so only ``vocab.txt`` is needed.
"""
from __future__ import annotations

import os

from didr_jax.text.clip_tokenizer import PaddedTokenizer, TokenizerFilesError

IMAGEREWARD_MAX_LENGTH = 35


class BertTokenizer(PaddedTokenizer):
  """[CLS] ... [SEP] padded with [PAD] (id 0) to 35; the attention mask is ``ids != pad_token_id``."""

  def __init__(self, hf_tokenizer, max_length: int = IMAGEREWARD_MAX_LENGTH):
    super().__init__(hf_tokenizer, max_length)


def load_bert_tokenizer(folder: str, *, max_length: int = IMAGEREWARD_MAX_LENGTH) -> BertTokenizer:
  """transformers' BertTokenizer (lower case) from ``folder/vocab.txt`` (local files only)."""
  vocab = os.path.join(folder, "vocab.txt")
  if not os.path.isfile(vocab):
    raise TokenizerFilesError(f"{folder}: tokenizer file 'vocab.txt' missing (ImageReward needs the "
                              "bert-base-uncased vocab.txt next to its weights)")
  from transformers import BertTokenizer as HFBertTokenizer  # lazy: transformers is heavy
  # (transformers 5: the constructor's vocab_file argument is ignored; from_pretrained reads it)
  hf = HFBertTokenizer.from_pretrained(folder, do_lower_case=True, local_files_only=True)
  if hf.pad_token_id != 0 or hf.cls_token_id is None:
    raise TokenizerFilesError(f"{vocab}: expected [PAD] at id 0 and a [CLS] token (bert-base-uncased)")
  return BertTokenizer(hf, max_length)
