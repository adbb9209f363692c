"""Explicit mapping table: diffusers ``PixArtTransformer2DModel`` state dict <-> our NNX state.

The blocks' parameters are stacked along a leading layer axis (scanned); their rules name the
stacked sources ``transformer_blocks.*.<suffix>`` that ``didr_jax.weights.stacking.stack_layers``
builds lazily from the per-layer keys (``diffusers_loading`` does it on load, and splits them back
on export), so a device still reads only the layers of its own shard.
"""
from __future__ import annotations

from didr_jax.models.pixart import PixArtConfig
from didr_jax.weights import Rule

BLOCKS = "transformer_blocks"
# (flax path, torch path) of a block's linears
_BLOCK_LINEARS = ([(f"{a}.{n}", f"{a}.{n}") for a in ("attn1", "attn2")
                   for n in ("to_q", "to_k", "to_v", "to_out.0")]
                  + [("ff_proj", "ff.net.0.proj"), ("ff_out", "ff.net.2")])
_BLOCK_SUFFIXES = ({"scale_shift_table"}
                   | {f"{t}.{w}" for _, t in _BLOCK_LINEARS for w in ("weight", "bias")})


def stacked_layers(cfg: PixArtConfig) -> dict:
  """{stack: (layers, the block's torch suffixes)}: what ``weights.stacking`` stacks on load."""
  return {BLOCKS: (cfg.num_layers, _BLOCK_SUFFIXES)}


def pixart_rules(cfg: PixArtConfig) -> list[Rule]:
  """Every parameter with its diffusers key (stacked blocks: ``transformer_blocks.*.<suffix>``)."""
  rules: list[Rule] = []

  def linear(flax: str, torch: str | None = None, *, bias: bool = True, transform: str = "linear"):
    torch = torch or flax
    rules.append(Rule(f"{flax}.kernel", f"{torch}.weight", transform))
    if bias:
      rules.append(Rule(f"{flax}.bias", f"{torch}.bias"))

  linear("pos_embed.proj", transform="conv")
  embedders = ["timestep_embedder"]
  if cfg.additional_conditions:
    embedders += ["resolution_embedder", "aspect_ratio_embedder"]
  for e in embedders:
    for n in ("linear_1", "linear_2"):
      linear(f"adaln_single.emb.{e}.{n}")
  linear("adaln_single.linear")
  if cfg.caption_channels is not None:
    linear("caption_projection.linear_1")
    linear("caption_projection.linear_2")
  rules.append(Rule(f"{BLOCKS}.scale_shift_table", f"{BLOCKS}.*.scale_shift_table"))
  for flax, torch in _BLOCK_LINEARS:
    qkv = flax.split(".")[-1] in ("to_q", "to_k", "to_v")
    linear(f"{BLOCKS}.{flax}", f"{BLOCKS}.*.{torch}", bias=cfg.attention_bias or not qkv,
           transform="stacked_linear")
  rules.append(Rule("scale_shift_table", "scale_shift_table"))
  linear("proj_out")
  return rules
