"""Scaled dot-product attention behind a config enum, with an XLA reference path.

``xla``   - explicit einsum + float32 softmax: the reference every fast path is tested against;
``jax``   - ``jax.nn.dot_product_attention(implementation=None)`` (XLA picks);
``cudnn`` - ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs only);
``splash`` - the Pallas splash-attention kernel shipped with JAX for TPUs: logits are computed block
            by block and never stored whole (the ``xla`` path holds float32 [B, H, Tq, Tk]); on
            other platforms it runs in Pallas interpret mode (for tests: slow).
Inputs are [batch, seq, heads, head_dim].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "jax", "cudnn", "splash")
SPLASH_LANES = 128           # splash blocks are multiples of the TPU's 128 lanes
SPLASH_BLOCK = 512


def check_attention_impl(name: str) -> str:
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r} unknown; choose one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  return name


def dot_product_attention(q, k, v, *, implementation: str = "xla", causal: bool = False,
                          mask=None):
  """softmax(q k^T / sqrt(d)) v. ``mask``: boolean, broadcastable to [B, H, Tq, Tk], True = keep."""
  check_attention_impl(implementation)
  if implementation == "splash":
    if causal:
      raise ValueError("attention 'splash': causal attention is not supported; use 'xla'")
    return splash_attention(q, k, v, mask)
  if implementation != "xla":
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal,
        implementation=None if implementation == "jax" else implementation)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    tq, tk = q.shape[1], k.shape[1]
    causal_mask = jnp.tril(jnp.ones((tq, tk), bool))
    mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _key_mask(mask, batch: int, tk: int):
  """A boolean mask that keeps or drops whole keys ([B or 1, 1, 1, Tk]) as [B, Tk]."""
  mask = jnp.asarray(mask)
  if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
    raise ValueError(f"attention 'splash': mask of shape {mask.shape} given; only key masks "
                     "[B, 1, 1, Tk] are supported")
  return jnp.broadcast_to(mask[:, 0, 0, :], (batch, tk))


def _splash_block(length: int) -> int:
  return SPLASH_BLOCK if length % SPLASH_BLOCK == 0 else SPLASH_LANES


def _batch_axes(batch: int, heads: int):
  """(batch axes, head axis) of the context mesh that divide the batch / heads, for shard_map."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, (), None
  axes, size = [], 1
  for name in ("data", "fsdp"):
    n = mesh.shape.get(name, 1)
    if n > 1 and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  n = mesh.shape.get("tensor", 1)
  return mesh, tuple(axes), ("tensor" if n > 1 and heads % n == 0 else None)


def splash_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v with the Pallas splash kernel ([B, T, H, D] in and out).

  Sequences are padded to whole blocks; padded keys (and keys ``mask`` drops) get segment id 1,
  every query segment 0, so no query attends to them (padded query rows attend to the real keys,
  so no softmax row is empty, and are cut off; an example whose keys are all masked has no
  softmax at all, where the ``xla`` path averages v). Under a mesh the kernel runs per shard
  (``shard_map``) over the batch axes (data, fsdp) that divide the batch and over ``tensor`` for
  the heads when it divides them; other axes hold whole copies. Interpret mode unless the mesh's
  (or the default) platform is TPU.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  batch, tq, heads, dim = q.shape
  tk = k.shape[1]
  pad_q, pad_k = -tq % SPLASH_LANES, -tk % SPLASH_LANES
  keep = jnp.ones((batch, tk), bool) if mask is None else _key_mask(mask, batch, tk)
  kv_ids = jnp.pad(jnp.where(keep, 0, 1).astype(jnp.int32), ((0, 0), (0, pad_k)), constant_values=1)
  q_ids = jnp.zeros((batch, tq + pad_q), jnp.int32)
  heads_first = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  qh = heads_first(q * jnp.asarray(dim ** -0.5, q.dtype), pad_q)
  kh, vh = heads_first(k, pad_k), heads_first(v, pad_k)
  mesh, batch_axes, head_axis = _batch_axes(batch, heads)
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  local_heads = heads // (mesh.shape["tensor"] if head_axis else 1)
  bq, bk = _splash_block(tq + pad_q), _splash_block(tk + pad_k)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)

  def attend(qh, kh, vh, q_ids, kv_ids):
    full = sm.MultiHeadMask([sm.FullMask((qh.shape[2], kh.shape[2]))] * local_heads)
    kernel = sk.make_splash_mha_single_device(full, block_sizes=blocks, interpret=platform != "tpu")
    return jax.vmap(kernel)(qh, kh, vh, segment_ids=sk.SegmentIds(q_ids, kv_ids))

  if batch_axes or head_axis:
    from jax.sharding import PartitionSpec as P
    b = batch_axes or None
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(P(b, head_axis), P(b, head_axis),
                                                        P(b, head_axis), P(b), P(b)),
                           out_specs=P(b, head_axis), check_vma=False)
  out = attend(qh, kh, vh, q_ids, kv_ids)
  return out.transpose(0, 2, 1, 3)[:, :tq].astype(v.dtype)
