"""Prompt conditioning: CLIP text encoders in JAX, SDXL add_time_ids, a host embedding cache.

SDXL (MODELS.md 2.2): context = concat(enc1 penultimate, enc2 penultimate) [B, 77, 768 + 1280],
pooled = enc2 projected EOS feature, time_ids = (res, res, 0, 0, res, res); unconditional input =
zeros for context and pooled, same time_ids. SD1.5: context = enc1 last hidden (after the final
LN); unconditional = the encoding of "". The reward's token ids ride along in the cond pytree.
"""
from __future__ import annotations

import collections
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
  """Prompts -> host cond rows (numpy) with an LRU cache of per-prompt embeddings.

  ``towers``: [(tokenizer, graphdef, params)] (SDXL: CLIP-L then bigG; SD1.5: one tower);
  ``reward_tokenizer``: the reward's tokenizer (None: the reward takes no prompts).
  """

  def __init__(self, backbone: str, towers, reward_tokenizer, *, resolution: int, dtype,
               cache_size: int):
    self.backbone, self.towers, self.reward_tokenizer = backbone, towers, reward_tokenizer
    self.resolution, self.dtype, self.cache_size = int(resolution), dtype, int(cache_size)
    self._cache: collections.OrderedDict = collections.OrderedDict()
    graphs = [g for _, g, _ in towers]
    sdxl = backbone == "sdxl"

    def embed(params, ids):
      outs = [nnx.merge(g, p)(i) for g, p, i in zip(graphs, params, ids)]
      if sdxl:
        context = jnp.concatenate([o[1] for o in outs], axis=-1)
        return {"context": context.astype(dtype), "pooled": outs[-1][2].astype(jnp.float32)}
      return {"context": outs[0][0].astype(dtype)}

    self._embed = jax.jit(embed)
    self.empty = None if sdxl else self._encode_new([""])["context"][0]

  def _encode_new(self, prompts: list[str]) -> dict:
    ids = [tok(prompts) for tok, _, _ in self.towers]
    out = self._embed([p for _, _, p in self.towers], ids)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}

  def encode(self, prompts: Sequence[str]) -> dict:
    """Host arrays [len(prompts), ...]: context (+ pooled, time_ids), reward_ids."""
    prompts = list(prompts)
    new = sorted({p for p in prompts if p not in self._cache})
    rows = {}
    if new:
      enc = self._encode_new(new)
      for i, p in enumerate(new):
        rows[p] = {k: v[i] for k, v in enc.items()}
    for p in prompts:
      if p in self._cache:
        self._cache.move_to_end(p)
        rows[p] = self._cache[p]
    if self.cache_size > 0:
      for p in new:
        self._cache[p] = rows[p]
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    out = {k: np.stack([rows[p][k] for p in prompts]) for k in rows[prompts[0]]}
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


def place(host: dict, sharding_for) -> dict:
  """Process-local host rows -> global arrays (``sharding_for(ndim)`` gives each leaf's sharding)."""
  return {k: jax.make_array_from_process_local_data(sharding_for(v.ndim), v) for k, v in host.items()}
