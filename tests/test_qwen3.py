"""Qwen3 text encoder (Z-Image) against transformers: hidden states, a gradient, the loader's
errors, full-size key coverage, and the chat-template tokenisation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# torch through clip_torch_env: its torchvision workaround (CPU torch) must precede transformers.
from tests.clip_torch_env import torch  # noqa: I001

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3Model
from transformers import Qwen3Config as HFQwen3Config

from tests.text_fixtures import write_qwen3_tokenizer
from didr_jax.models.qwen3 import HF_DEFAULTS, Qwen3Config, Qwen3TextEncoder
from didr_jax.models.qwen3_mapping import IGNORED_KEYS, from_transformers_qwen3, qwen3_rules
from didr_jax.sharding import get_rules, model_context, single_device_mesh
from didr_jax.text.qwen3_tokenize import load_qwen3_tokenizer
from didr_jax.weights import TRANSFORMS, WeightMismatchError, flat_state, write_safetensors
from didr_jax.weights.safetensors_io import read_safetensors

pytestmark = pytest.mark.parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GQA (4 query heads on 2 kv heads) and head_dim 16 != 64 / 4, to catch a hidden/heads head size.
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, num_hidden_layers=3, vocab_size=128, rope_theta=1e6)
LENGTHS, SEQ = (12, 7), 12
# Qwen3-4B's config.json (Z-Image's text encoder), legacy rope fields as the hub file has them.
QWEN3_4B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=2560,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, rope_theta=1000000, rope_scaling=None,
                rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
                hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                use_sliding_window=False, sliding_window=None, max_window_layers=36,
                bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")

call = jax.jit(lambda m, ids, mask: m(ids, mask))


def _ids(lengths=LENGTHS, seq=SEQ, seed=0):
  """Right-padded random prompts (pad id 0) and their 0/1 mask."""
  rng = np.random.default_rng(seed)
  ids, mask = np.zeros((len(lengths), seq), np.int32), np.zeros((len(lengths), seq), np.int32)
  for b, n in enumerate(lengths):
    ids[b, :n], mask[b, :n] = rng.integers(1, TINY["vocab_size"], n), 1
  return ids, mask


def _max_real_err(got, want, mask):
  keep = np.asarray(mask, bool)
  return float(np.max(np.abs(np.asarray(got)[keep] - np.asarray(want)[keep])))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch Qwen3ForCausalLM, CausalLM folder with lm_head, sharded Qwen3Model folder)."""
  torch.manual_seed(0)
  ref = Qwen3ForCausalLM(HFQwen3Config(**TINY, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  lm_folder, base_folder = (str(tmp_path_factory.mktemp(n)) for n in ("causal_lm", "qwen3_model"))
  ref.save_pretrained(lm_folder)                             # untied: lm_head.weight is in it
  ref.model.save_pretrained(base_folder, max_shard_size="40KB")  # no 'model.' prefix, sharded
  return ref, lm_folder, base_folder


def test_tiny_folders_have_both_namings(tiny):
  _, lm_folder, base_folder = tiny
  lm_keys = set(read_safetensors(os.path.join(lm_folder, "model.safetensors")))
  assert "lm_head.weight" in lm_keys and "model.embed_tokens.weight" in lm_keys
  with open(os.path.join(base_folder, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 1 and "embed_tokens.weight" in weight_map


@pytest.mark.parametrize("which", ["causal_lm", "qwen3_model_sharded", "causal_lm_remat_jax_attn"])
def test_every_hidden_state_matches_transformers(tiny, which):
  ref, lm_folder, base_folder = tiny
  if which == "causal_lm_remat_jax_attn":
    model = from_transformers_qwen3(lm_folder, remat="full", attention="jax")
  else:
    model = from_transformers_qwen3(lm_folder if which == "causal_lm" else base_folder)
  ids, mask = _ids()
  with torch.no_grad():
    out = ref.model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
  got = call(model, ids, mask)
  assert len(got) == len(out.hidden_states) == TINY["num_hidden_layers"] + 1
  # transformers' last entry is the final-normed last_hidden_state
  assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
  errs = [_max_real_err(g, w.numpy(), mask) for g, w in zip(got, out.hidden_states)]
  print(f"{which}: max abs err per hidden state {['%.2e' % e for e in errs]}")
  assert max(errs) <= 1e-5, errs


def test_padding_does_not_change_real_tokens(tiny):
  _, lm_folder, _ = tiny
  model = from_transformers_qwen3(lm_folder)
  ids, mask = _ids()
  batch = call(model, ids, mask)
  n = LENGTHS[1]
  alone = call(model, ids[1:, :n], mask[1:, :n])                        # unpadded
  longer = call(model, np.pad(ids, ((0, 0), (0, 8))), np.pad(mask, ((0, 0), (0, 8))))
  err_alone = max(float(jnp.max(jnp.abs(b[1, :n] - a[0]))) for b, a in zip(batch, alone))
  err_longer = max(_max_real_err(b, l[:, :SEQ], mask) for b, l in zip(batch, longer))
  print(f"padding: max abs diff alone {err_alone:.2e}, 8 more pads {err_longer:.2e}")
  assert err_alone <= 1e-5 and err_longer <= 1e-5


def test_parameter_gradient_matches_torch_autograd(tiny):
  """d sum(hidden_states[-2] * R over real tokens) / d layers.0.self_attn.q_proj weight."""
  ref, lm_folder, _ = tiny
  model = from_transformers_qwen3(lm_folder)
  ids, mask = _ids()
  r = np.random.default_rng(1).standard_normal((*ids.shape, TINY["hidden_size"])).astype(np.float32)
  w = ref.model.layers[0].self_attn.q_proj.weight
  w.grad = None
  out = ref.model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                  output_hidden_states=True)
  (out.hidden_states[-2] * torch.from_numpy(r * mask[..., None])).sum().backward()
  want = w.grad.numpy().T

  def loss(m):
    return jnp.sum(m(ids, mask)[-2] * r * mask[..., None])
  grads = flat_state(jax.jit(nnx.grad(loss))(model))
  got = grads["layers.0.self_attn.q_proj.kernel"]
  got = np.asarray(got.get_value() if hasattr(got, "get_value") else got)
  err = float(np.max(np.abs(got - want)))
  print(f"q_proj gradient: max abs err {err:.2e} (max |grad| {np.max(np.abs(want)):.2e})")
  assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


def _rewrite(src, dst, edit):
  """Copy a single-file folder with its tensors edited by ``edit(dict)``."""
  os.makedirs(dst)
  tensors = {k: np.array(v) for k, v in read_safetensors(os.path.join(src, "model.safetensors")).items()}
  edit(tensors)
  write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_bad_folders_name_the_key(tiny, tmp_path):
  _, lm_folder, _ = tiny
  gone = "model.layers.1.self_attn.k_norm.weight"
  renamed = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.upproj.weight")
  shaped = "model.layers.2.self_attn.k_proj.weight"
  cases = {
      "removed": (lambda t: t.pop(gone), [gone]),
      "renamed": (lambda t: t.__setitem__(renamed[1], t.pop(renamed[0])), list(renamed)),
      "reshaped": (lambda t: t.__setitem__(shaped, t[shaped][:-1]), [shaped]),
      "stray": (lambda t: t.__setitem__("embed_tokens.weight", t["model.embed_tokens.weight"]),
                ["embed_tokens.weight"]),
  }
  for name, (edit, keys) in cases.items():
    with pytest.raises(WeightMismatchError) as e:
      from_transformers_qwen3(_rewrite(lm_folder, str(tmp_path / name), edit))
    assert all(k in str(e.value) for k in keys), (name, str(e.value))
  # a config that turns sliding-window attention on: refused naming the field
  folder = _rewrite(lm_folder, str(tmp_path / "sliding"), lambda t: None)
  with open(os.path.join(folder, "config.json")) as f:
    d = json.load(f)
  d.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
  d.pop("layer_types")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(d, f)
  with pytest.raises(ValueError, match="use_sliding_window"):
    from_transformers_qwen3(folder)


def test_config_fields_are_validated_by_name():
  base = HFQwen3Config(**TINY).to_dict()
  cfg = Qwen3Config.from_hf_config(base)
  assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (16, 2, 1e6)
  sliding = HFQwen3Config(**TINY, use_sliding_window=True, sliding_window=4,
                          max_window_layers=1).to_dict()
  bad = {
      "layer_types": sliding,
      "rope_scaling.rope_type": {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
      "rope_parameters.rope_type": {**base, "rope_parameters": {"rope_type": "linear",
                                                                "factor": 2.0}},
      "hidden_act": {**base, "hidden_act": "gelu"},
      "num_key_value_heads": {**base, "num_key_value_heads": 3},
      "model_type": {**base, "model_type": "qwen2"},
      "head_dim": {**base, "head_dim": None},
  }
  for field, d in bad.items():
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      Qwen3Config.from_hf_config(d)


def test_hf_defaults_match_installed_transformers():
  hf = HFQwen3Config()
  for k, v in HF_DEFAULTS.items():
    want = hf.rope_parameters["rope_theta"] if k == "rope_theta" else getattr(hf, k)
    if k == "sliding_window":   # the config nulls it unless use_sliding_window
      want = HFQwen3Config(use_sliding_window=True).sliding_window
    assert v == want, k


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3Model"])
def test_rules_cover_full_size_qwen3_4b_exactly(arch):
  cfg = Qwen3Config.from_hf_config(QWEN3_4B)
  assert cfg == Qwen3Config()       # the defaults are Qwen3-4B
  with model_context(single_device_mesh(), get_rules("replicated")):   # eval_shape needs a mesh
    abstract = nnx.eval_shape(lambda: Qwen3TextEncoder(cfg, rngs=nnx.Rngs(0)))
  ours = {k: tuple((v.get_value() if hasattr(v, "get_value") else v).shape)
          for k, v in flat_state(nnx.state(abstract)).items()}
  with torch.device("meta"):
    ref = (Qwen3ForCausalLM if arch == "Qwen3ForCausalLM" else Qwen3Model)(HFQwen3Config(**QWEN3_4B))
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert ("lm_head.weight" in theirs) == (arch == "Qwen3ForCausalLM")
  rules = qwen3_rules(cfg, src="model." if arch == "Qwen3ForCausalLM" else "")
  assert sorted(r.target for r in rules) == sorted(ours)
  assert sorted(r.source for r in rules) == sorted(set(theirs) - set(IGNORED_KEYS))
  for r in rules:
    dummy = np.broadcast_to(np.float32(0), theirs[r.source])    # shape only, no memory
    assert TRANSFORMS[r.transform].to_flax(dummy).shape == ours[r.target], r
  assert ours["layers.0.self_attn.q_proj.kernel"] == (2560, 32 * 128)
  assert ours["layers.0.self_attn.k_proj.kernel"] == (2560, 8 * 128)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
  return write_qwen3_tokenizer(str(tmp_path_factory.mktemp("qwen3_tokenizer")))


PROMPTS = ["a photo of a cat", "An astronaut riding a horse,\n4k — ünïcode <think> 'll",
           " ".join(["the lazy dog jumps over a quick brown fox"] * 60)]   # > 512 tokens


def test_tokenizer_matches_pipeline_tokenisation(tokenizer_folder):
  """ZImagePipeline._encode_prompt: apply_chat_template(enable_thinking=True) then max_length 512."""
  ours = load_qwen3_tokenizer(tokenizer_folder)
  ref = AutoTokenizer.from_pretrained(tokenizer_folder)
  texts = [ref.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True) for p in PROMPTS]
  for p, t in zip(PROMPTS, texts):
    assert ours.chat_text(p) == t == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
  want = ref(texts, padding="max_length", max_length=512, truncation=True, return_tensors="np")
  ids, mask = ours(PROMPTS)
  assert ids.shape == mask.shape == (3, 512) and ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"])
  n = int(mask[0].sum())
  assert ids[0, 0] == ref.convert_tokens_to_ids("<|im_start|>") and mask[0, :n].all()
  assert (ids[0, n:] == ref.convert_tokens_to_ids("<|endoftext|>")).all()   # right padding
  assert mask[2].all()                                                       # truncated at 512


def test_tokenizer_imports_no_torch(tokenizer_folder):
  code = ("import sys\nfrom didr_jax.text.qwen3_tokenize import load_qwen3_tokenizer\n"
          f"ids, mask = load_qwen3_tokenizer({tokenizer_folder!r})(['a cat'])\n"
          "assert ids.shape == (1, 512), ids.shape\n"
          "assert 'torch' not in sys.modules, 'torch imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
