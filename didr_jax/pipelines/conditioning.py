"""Prompt conditioning: text encoders in JAX, extra conditions, precomputed prompt tables.

Per text kind (docs/models.md), the cond rows a backbone's network reads:
  clip_sdxl : context = concat(enc1 penultimate, enc2 penultimate) [B, 77, 768 + 1280], pooled = enc2
              projected EOS feature, time_ids = (res, res, 0, 0, res, res); uncond = zeros for
              context and pooled, same time_ids.
  clip_sd15 : context = enc1 last hidden (after the final LN); uncond = the encoding of "".
  t5        : (PixArt) context = T5 last hidden [B, 120, 4096], mask [B, 120]; resolution (res, res)
              and aspect_ratio 1 (read when the transformer uses additional conditions);
              uncond = the encoding of "" (context and mask).
  qwen3     : (Z-Image) context = Qwen3 hidden_states[-2] [B, 512, 2560], mask; uncond = encoding of "".
The reward's token ids ride along in the cond pytree.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _clip_sd15(models, tokens):
  return {"context": models[0](tokens[0])[0]}


def _clip_sdxl(models, tokens):
  outs = [m(t) for m, t in zip(models, tokens)]
  return {"context": jnp.concatenate([o[1] for o in outs], axis=-1), "pooled": outs[-1][2]}


def _t5(models, tokens):
  ids, mask = tokens[0]
  return {"context": models[0](ids, mask), "mask": mask.astype(bool)}


def _qwen3(models, tokens):
  ids, mask = tokens[0]
  return {"context": models[0](ids, mask)[-2], "mask": mask.astype(bool)}


def _sdxl_extra(resolution: float, n: int) -> dict:
  r = float(resolution)
  return {"time_ids": np.tile(np.asarray([[r, r, 0.0, 0.0, r, r]], np.float32), (n, 1))}


def _pixart_extra(resolution: float, n: int) -> dict:
  r = float(resolution)
  return {"resolution": np.full((n, 2), r, np.float32), "aspect_ratio": np.ones((n, 1), np.float32)}


@dataclasses.dataclass(frozen=True)
class TextKind:
  embed: Callable                   # (tower modules, tokenizer outputs) -> {key: array}
  uncond: str                       # "zeros" | "empty_prompt"
  extra: Callable = lambda resolution, n: {}   # non-text rows (kept as they are for uncond)


TEXT = {"clip_sdxl": TextKind(_clip_sdxl, "zeros", _sdxl_extra),
        "clip_sd15": TextKind(_clip_sd15, "empty_prompt"),
        "t5": TextKind(_t5, "empty_prompt", _pixart_extra),
        "qwen3": TextKind(_qwen3, "empty_prompt")}


class HashTokenizer:
  """Words -> ids by CRC32 for *random* tiny text towers (no vocabulary exists to respect).

  Ids lie in [2, eos), EOS is the largest id (argmax pooling finds it), padding is 0.
  ``with_mask``: return (ids, attention mask) as the T5 and Qwen3 tokenizers do.
  """

  def __init__(self, vocab_size: int, max_length: int, with_mask: bool = False):
    self.vocab_size, self.max_length = int(vocab_size), int(max_length)
    self.eos_token_id = self.vocab_size - 1
    self.with_mask = with_mask

  def lengths(self, prompts: Sequence[str]) -> np.ndarray:
    """Untruncated token counts (words + EOS)."""
    return np.asarray([len(p.split()) + 1 for p in prompts], np.int64)

  def __call__(self, prompts: str | Sequence[str]):
    if isinstance(prompts, str):
      prompts = [prompts]
    out = np.zeros((len(prompts), self.max_length), np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    for i, p in enumerate(prompts):
      ids = [2 + zlib.crc32(w.encode()) % (self.eos_token_id - 2) for w in p.lower().split()]
      ids = ids[: self.max_length - 1] + [self.eos_token_id]
      out[i, : len(ids)] = ids
      mask[i, : len(ids)] = 1
    return (out, mask) if self.with_mask else out


class PromptEncoder:
  """Prompts -> host cond rows (numpy), always in fixed blocks of ``block`` prompts.

  Every call pads to whole blocks, so the text towers compile once and a batch's embeddings are a
  function of the batch alone, never of what was encoded before (a resumed run sees exactly the
  conds of an uninterrupted one). ``backbone``: a ``backbones.BACKBONES`` name (its text kind);
  ``towers``: [(tokenizer, graphdef, params)] in the backbone's order; ``reward_tokenizer``: the
  reward's (None: no prompts); ``empty``: the unconditional text rows {key: [...]} when known
  (else the towers encode "").
  """

  def __init__(self, backbone: str, towers, reward_tokenizer, *, resolution: int, dtype, block: int,
               empty=None):
    from didr_jax.pipelines.backbones import get
    if block < 1:
      raise ValueError(f"block={block}: expected >= 1 prompts per text-encoder call")
    self.backbone, self.towers, self.reward_tokenizer = backbone, towers, reward_tokenizer
    self.resolution, self.dtype, self.block = int(resolution), dtype, int(block)
    self.kind = TEXT[get(backbone).text]
    graphs = [g for _, g, _ in towers]
    embed_rows = self.kind.embed

    def embed(params, tokens):
      out = embed_rows([nnx.merge(g, p) for g, p in zip(graphs, params)], tokens)
      return {k: v.astype(dtype if k == "context" else (bool if k == "mask" else jnp.float32))
              for k, v in out.items()}

    self._embed = jax.jit(embed)
    self.empty = None
    if self.kind.uncond == "empty_prompt":
      self.empty = empty if empty is not None else {
          k: v[0] for k, v in self._embed_blocks([""]).items()}

  def _embed_blocks(self, prompts: list[str]) -> dict:
    padded = prompts + [""] * (-len(prompts) % self.block)
    parts = []
    for i in range(0, len(padded), self.block):
      chunk = padded[i:i + self.block]
      out = self._embed([p for _, _, p in self.towers], [tok(chunk) for tok, _, _ in self.towers])
      parts.append({k: np.asarray(jax.device_get(v)) for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts])[:len(prompts)] for k in parts[0]}

  def encode(self, prompts: Sequence[str]) -> dict:
    """Host arrays [len(prompts), ...]: the text rows, the backbone's extra rows, reward_ids."""
    prompts = list(prompts)
    out = self._embed_blocks(prompts)
    out.update(self.kind.extra(self.resolution, len(prompts)))
    if self.reward_tokenizer is not None:
      out["reward_ids"] = np.asarray(self.reward_tokenizer(prompts), np.int32)
    return out

  def uncond(self, cond: dict) -> dict:
    """The CFG unconditional input for a cond pytree (jittable): the text rows replaced."""
    out = dict(cond)
    if self.kind.uncond == "zeros":
      for k in ("context", "pooled"):
        out[k] = jnp.zeros_like(cond[k])
    else:
      for k, row in self.empty.items():
        out[k] = jnp.broadcast_to(jnp.asarray(row, cond[k].dtype), cond[k].shape)
    return out


class PromptTable:
  """Host cond rows of a whole prompt set, encoded once (``data.precompute_embeddings``)."""

  def __init__(self, encoder: PromptEncoder, prompts: Sequence[str]):
    self.rows = encoder.encode(prompts)
    self.nbytes = sum(v.nbytes for v in self.rows.values())

  def lookup(self, indices: np.ndarray) -> dict:
    return {k: v[indices] for k, v in self.rows.items()}
