"""Explicit mapping table: diffusers ``UNet2DConditionModel`` state dict <-> our NNX state.

The table is generated from the config by walking the same block plan the model is built from
(``unet.block_specs``); each module kind lists its keys explicitly. Nothing is inferred from
tensor ranks: ``proj_in``/``proj_out`` use ``conv1x1_linear`` exactly when the config says
``use_linear_projection=False``.
"""
from __future__ import annotations

from didr_jax.models.unet import UNetConfig, block_specs
from didr_jax.weights import Rule


class RuleBuilder:
  """Accumulates rules; methods name one module kind each (flax prefix, torch prefix)."""

  def __init__(self):
    self.rules: list[Rule] = []

  def linear(self, flax: str, torch: str | None = None, *, bias: bool = True,
             transform: str = "linear"):
    torch = torch or flax
    self.rules.append(Rule(f"{flax}.kernel", f"{torch}.weight", transform))
    if bias:
      self.rules.append(Rule(f"{flax}.bias", f"{torch}.bias"))

  def conv(self, name: str):
    self.linear(name, transform="conv")

  def norm(self, name: str):
    self.rules.append(Rule(f"{name}.scale", f"{name}.weight"))
    self.rules.append(Rule(f"{name}.bias", f"{name}.bias"))

  def resnet(self, p: str, cin: int, cout: int, *, time_emb: bool = True):
    self.norm(f"{p}.norm1")
    self.conv(f"{p}.conv1")
    if time_emb:
      self.linear(f"{p}.time_emb_proj")
    self.norm(f"{p}.norm2")
    self.conv(f"{p}.conv2")
    if cin != cout:
      self.conv(f"{p}.conv_shortcut")

  def attention(self, p: str, *, bias: bool):
    """q/k/v projections (bias only in the VAE) and ``to_out.0`` (always biased)."""
    for name in ("to_q", "to_k", "to_v"):
      self.linear(f"{p}.{name}", bias=bias)
    self.linear(f"{p}.to_out.0")

  def transformer(self, p: str, num_layers: int, linear_projection: bool):
    proj = "linear" if linear_projection else "conv1x1_linear"
    self.norm(f"{p}.norm")
    self.linear(f"{p}.proj_in", transform=proj)
    for k in range(num_layers):
      b = f"{p}.transformer_blocks.{k}"
      for n in ("norm1", "norm2", "norm3"):
        self.norm(f"{b}.{n}")
      self.attention(f"{b}.attn1", bias=False)
      self.attention(f"{b}.attn2", bias=False)
      self.linear(f"{b}.ff.proj", f"{b}.ff.net.0.proj")
      self.linear(f"{b}.ff.out", f"{b}.ff.net.2")
    self.linear(f"{p}.proj_out", transform=proj)


def unet_rules(cfg: UNetConfig) -> list[Rule]:
  """Every parameter of our UNet for ``cfg``, with its diffusers key and layout transform."""
  r = RuleBuilder()
  lin = cfg.use_linear_projection
  r.conv("conv_in")
  r.linear("time_embedding.linear_1")
  r.linear("time_embedding.linear_2")
  if cfg.time_cond_proj_dim:
    r.linear("time_embedding.cond_proj", bias=False)
  if cfg.addition_embed_type == "text_time":
    r.linear("add_embedding.linear_1")
    r.linear("add_embedding.linear_2")
  down, mid, up = block_specs(cfg)
  for blocks, specs, sampler in (("down_blocks", down, "downsamplers"),
                                 ("up_blocks", up, "upsamplers")):
    for i, s in enumerate(specs):
      for j in range(s.num_layers):
        r.resnet(f"{blocks}.{i}.resnets.{j}", *s.resnet_io(j))
        if s.cross_attention:
          r.transformer(f"{blocks}.{i}.attentions.{j}", s.transformer_layers, lin)
      if s.resample:
        r.conv(f"{blocks}.{i}.{sampler}.0.conv")
  if mid is not None:
    for j in range(2):
      r.resnet(f"mid_block.resnets.{j}", mid.out_channels, mid.out_channels)
    r.transformer("mid_block.attentions.0", mid.transformer_layers, lin)
  r.norm("conv_norm_out")
  r.conv("conv_out")
  return r.rules
