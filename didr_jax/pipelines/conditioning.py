"""Prompt conditioning: CLIP text encoders in JAX, SDXL add_time_ids, precomputed prompt tables.

SDXL (docs/models.md): context = concat(enc1 penultimate, enc2 penultimate) [B, 77, 768 + 1280],
pooled = enc2 projected EOS feature, time_ids = (res, res, 0, 0, res, res); unconditional input =
zeros for context and pooled, same time_ids. SD1.5: context = enc1 last hidden (after the final
LN); unconditional = the encoding of "". The reward's token ids ride along in the cond pytree.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class HashTokenizer:
  """Words -> ids by CRC32 for *random* tiny text towers (no vocabulary exists to respect).

  Ids lie in [2, eos), EOS is the largest id (argmax pooling finds it), padding is 0.
  """

  def __init__(self, vocab_size: int, max_length: int):
    self.vocab_size, self.max_length = int(vocab_size), int(max_length)
    self.eos_token_id = self.vocab_size - 1

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    out = np.zeros((len(prompts), self.max_length), np.int32)
    for i, p in enumerate(prompts):
      ids = [2 + zlib.crc32(w.encode()) % (self.eos_token_id - 2) for w in p.lower().split()]
      ids = ids[: self.max_length - 1] + [self.eos_token_id]
      out[i, : len(ids)] = ids
    return out


class PromptEncoder:
  """Prompts -> host cond rows (numpy), always in fixed blocks of ``block`` prompts.

  Every call pads to whole blocks, so the text towers compile once and a batch's embeddings are a
  function of the batch alone, never of what was encoded before (a resumed run sees exactly the
  conds of an uninterrupted one). ``towers``: [(tokenizer, graphdef, params)] (SDXL: CLIP-L then
  bigG; SD1.5: one tower); ``reward_tokenizer``: the reward's tokenizer (None: no prompts);
  ``empty``: SD1.5's unconditional context [77, D] when known (else the towers encode "").
  """

  def __init__(self, backbone: str, towers, reward_tokenizer, *, resolution: int, dtype, block: int,
               empty=None):
    if block < 1:
      raise ValueError(f"block={block}: expected >= 1 prompts per text-encoder call")
    self.backbone, self.towers, self.reward_tokenizer = backbone, towers, reward_tokenizer
    self.resolution, self.dtype, self.block = int(resolution), dtype, int(block)
    graphs = [g for _, g, _ in towers]
    sdxl = backbone == "sdxl"

    def embed(params, ids):
      outs = [nnx.merge(g, p)(i) for g, p, i in zip(graphs, params, ids)]
      if sdxl:
        context = jnp.concatenate([o[1] for o in outs], axis=-1)
        return {"context": context.astype(dtype), "pooled": outs[-1][2].astype(jnp.float32)}
      return {"context": outs[0][0].astype(dtype)}

    self._embed = jax.jit(embed)
    self.empty = None if sdxl else (empty if empty is not None else self.encode([""])["context"][0])

  def _embed_blocks(self, prompts: list[str]) -> dict:
    padded = prompts + [""] * (-len(prompts) % self.block)
    parts = []
    for i in range(0, len(padded), self.block):
      chunk = padded[i:i + self.block]
      out = self._embed([p for _, _, p in self.towers], [tok(chunk) for tok, _, _ in self.towers])
      parts.append({k: np.asarray(jax.device_get(v)) for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts])[:len(prompts)] for k in parts[0]}

  def encode(self, prompts: Sequence[str]) -> dict:
    """Host arrays [len(prompts), ...]: context (+ pooled, time_ids), reward_ids."""
    prompts = list(prompts)
    out = self._embed_blocks(prompts)
    if self.backbone == "sdxl":
      r = float(self.resolution)
      out["time_ids"] = np.tile(np.asarray([[r, r, 0.0, 0.0, r, r]], np.float32), (len(prompts), 1))
    if self.reward_tokenizer is not None:
      out["reward_ids"] = np.asarray(self.reward_tokenizer(prompts), np.int32)
    return out

  def uncond(self, cond: dict) -> dict:
    """The CFG unconditional input for a cond pytree (jittable)."""
    out = dict(cond)
    if self.backbone == "sdxl":
      out["context"] = jnp.zeros_like(cond["context"])
      out["pooled"] = jnp.zeros_like(cond["pooled"])
    else:
      out["context"] = jnp.broadcast_to(jnp.asarray(self.empty, cond["context"].dtype),
                                        cond["context"].shape)
    return out


class PromptTable:
  """Host cond rows of a whole prompt set, encoded once (``data.precompute_embeddings``)."""

  def __init__(self, encoder: PromptEncoder, prompts: Sequence[str]):
    self.rows = encoder.encode(prompts)
    self.nbytes = sum(v.nbytes for v in self.rows.values())

  def lookup(self, indices: np.ndarray) -> dict:
    return {k: v[indices] for k, v in self.rows.items()}
