"""Scaled dot-product attention behind a config enum, with an XLA reference path.

``xla``   - explicit einsum + float32 softmax: the reference every fast path is tested against;
``jax``   - ``jax.nn.dot_product_attention(implementation=None)`` (XLA picks);
``cudnn`` - ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs only).
Inputs are [batch, seq, heads, head_dim].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "jax", "cudnn")


def check_attention_impl(name: str) -> str:
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {name!r} unknown; choose one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  return name


def dot_product_attention(q, k, v, *, implementation: str = "xla", causal: bool = False,
                          mask=None):
  """softmax(q k^T / sqrt(d)) v. ``mask``: boolean, broadcastable to [B, H, Tq, Tk], True = keep."""
  check_attention_impl(implementation)
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
