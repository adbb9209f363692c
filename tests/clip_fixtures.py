"""Tiny random PyTorch CLIP references (transformers and open_clip), saved to disk. No downloads.

Import this before transformers (it goes through clip_torch_env). Used by tests/test_clip.py,
tests/test_rewards.py and benchmarks/rewards.py.
"""
from __future__ import annotations

import os

import numpy as np

from tests import clip_torch_env  # noqa: F401  (torchvision workaround; must precede transformers)
import torch

# Token ids: tiny vocab 1000; EOS 999 is the largest id so argmax pooling finds it.
VOCAB, EOS = 1000, 999
IMAGE, PATCH = 32, 4


def text_ids(batch=2, length=77, *, seed=0, lengths=(5, 9), pad=0):
  """BOS(0)-free random prompts with EOS at per-row positions and ``pad`` after it."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), pad, np.int64)
  for b in range(batch):
    n = lengths[b % len(lengths)]
    ids[b, :n] = rng.integers(3, 900, n)
    ids[b, n] = EOS
  return ids


def hf_text_model(folder, *, act, projection, legacy_eos, seed=0, prefixed=False):
  """transformers CLIPTextModel[WithProjection] saved with save_pretrained; returns the torch model.

  ``legacy_eos``: eos_token_id=2 (argmax pooling, SD configs) or the real EOS (first-EOS pooling).
  ``prefixed``: rewrite the file with 4.x-style 'text_model.' keys (hub SD/SDXL files)."""
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32 if projection else 16,
                       intermediate_size=64 if projection else 32, num_hidden_layers=3,
                       num_attention_heads=4 if projection else 2, hidden_act=act,
                       projection_dim=24, bos_token_id=0, pad_token_id=1,
                       eos_token_id=2 if legacy_eos else EOS)
  model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
  model.save_pretrained(folder)
  if prefixed:
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    assert not any(k.startswith("text_model.") for k in sd)
    save_file({f"text_model.{k}": v for k, v in sd.items()}, path, metadata={"format": "pt"})
  return model


REAL_VOCAB, REAL_EOS = 49408, 49407  # for end-to-end tests through the real CLIP tokenizer


def hf_clip_config(act="gelu", vocab=VOCAB, eos=EOS):
  from transformers import CLIPConfig
  return CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, hidden_act=act, bos_token_id=0, pad_token_id=1,
                       eos_token_id=eos),
      vision_config=dict(image_size=IMAGE, patch_size=PATCH, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, hidden_act=act),
      projection_dim=16)


def hf_clip_model(folder, *, act="gelu", seed=0, logit_scale=None, vocab=VOCAB, eos=EOS):
  from transformers import CLIPModel
  torch.manual_seed(seed)
  model = CLIPModel(hf_clip_config(act, vocab, eos)).eval()
  if logit_scale is not None:
    with torch.no_grad():
      model.logit_scale.fill_(logit_scale)
  model.save_pretrained(folder)
  return model


OPENCLIP_CFG = dict(embed_dim=16,
                    vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=PATCH, image_size=IMAGE),
                    text_cfg=dict(context_length=77, vocab_size=VOCAB, width=32, heads=4, layers=2))


def open_clip_model(path, *, quick_gelu=False, seed=0, vocab=VOCAB):
  """open_clip.model.CLIP with OPENCLIP_CFG, state dict written as safetensors to ``path``."""
  clip_torch_env.open_clip()
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
  from safetensors.torch import save_file
  torch.manual_seed(seed)
  model = CLIP(embed_dim=OPENCLIP_CFG["embed_dim"], vision_cfg=CLIPVisionCfg(**OPENCLIP_CFG["vision_cfg"]),
               text_cfg=CLIPTextCfg(**{**OPENCLIP_CFG["text_cfg"], "vocab_size": vocab}),
               quick_gelu=quick_gelu).eval()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return model


def openclip_config_dict(quick_gelu=False, vocab=VOCAB):
  return {**OPENCLIP_CFG, "quick_gelu": quick_gelu,
          "text_cfg": {**OPENCLIP_CFG["text_cfg"], "vocab_size": vocab}}


def tokenizer_folder(folder):
  """A transformers CLIPTokenizer folder built from the real BPE file inside open_clip_torch."""
  from didr_jax.text import write_clip_tokenizer_files
  oc = clip_torch_env.open_clip()
  gz = os.path.join(os.path.dirname(oc.__file__), "bpe_simple_vocab_16e6.txt.gz")
  return write_clip_tokenizer_files(gz, folder)


def nchw(x_nhwc):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(got - ref).max() / np.abs(ref).max())
