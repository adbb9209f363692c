"""The T5 v1.1 encoder against transformers' ``T5EncoderModel``: outputs, hidden states and gradients
on a tiny random model, padding, the weight table (bad, sharded, full and tied-alias folders, the
xxl key set), the config and PixArt-style tokenisation."""
import json
import os
import re
import shutil

import numpy as np
import pytest

# torch through clip_torch_env: its torchvision workaround runs before transformers is imported
from tests.clip_torch_env import torch  # noqa: I001
from tests.text_fixtures import write_t5_tokenizer
from transformers import T5Config, T5EncoderModel as HFT5EncoderModel, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import t5_mapping as tm
from didr_jax.models.clip_loading import CheckpointArchitectureError
from didr_jax.models.t5 import (HF_T5_DEFAULTS, T5EncoderConfig, T5EncoderModel,
                                relative_position_buckets)
from didr_jax.sharding import (abstract_model, get_rules, make_mesh, model_context,
                               single_device_mesh)
from didr_jax.text import TokenizerFilesError
from didr_jax.text import t5_tokenize
from didr_jax.weights import WeightMismatchError, flat_state
from didr_jax.weights.mapping import TRANSFORMS
from didr_jax.weights.safetensors_io import read_safetensors, write_safetensors

pytestmark = pytest.mark.parity

TINY = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=5, d_ff=64, num_layers=2,  # inner 40
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", dropout_rate=0.0)
# google/t5-v1_1-xxl's config.json (PixArt-alpha's text_encoder differs only in architectures)
XXL = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
       "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1,
       "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
       "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64,
       "num_layers": 24, "output_past": True, "pad_token_id": 0,
       "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128}
LENGTHS, SEQ = (7, 24), 24  # > max_distance + 1: the saturated buckets are used
ATOL = 1e-5

call = jax.jit(lambda m, ids, mask: m(ids, mask))
call_hidden = jax.jit(lambda m, ids, mask: m(ids, mask, output_hidden_states=True))


@jax.jit
def loss_grads(model, ids, mask, w):
  return nnx.grad(lambda m: jnp.sum(m(ids, mask) * w))(model)


def batch(lengths=LENGTHS, seq=SEQ, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), seq), np.int32)
  mask = np.zeros((len(lengths), seq), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n - 1] = rng.integers(3, TINY["vocab_size"], n - 1)
    ids[i, n - 1] = 1  # </s>
    mask[i, :n] = 1
  return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A random (norms too) tiny encoder saved single-file, sharded and inside a full T5."""
  torch.manual_seed(0)
  ref = HFT5EncoderModel(T5Config(**TINY)).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.add_(0.1 * torch.randn_like(p)) if name.endswith("layer_norm.weight") else p.normal_(0, 0.3)
  out = {k: str(tmp_path_factory.mktemp(k)) for k in ("single", "sharded", "full")}
  ref.save_pretrained(out["single"], safe_serialization=True)
  ref.save_pretrained(out["sharded"], safe_serialization=True, max_shard_size="20KB")
  full = T5ForConditionalGeneration(T5Config(**TINY))
  full.encoder.load_state_dict(ref.encoder.state_dict())
  full.save_pretrained(out["full"], safe_serialization=True)
  return out, ref


def hf_outputs(ref, ids, mask):
  with torch.no_grad():
    o = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True)
  return o.last_hidden_state.float().numpy(), [h.float().numpy() for h in o.hidden_states]


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_matches_transformers(folders, attn_impl):
  paths, ref = folders
  ref.set_attn_implementation(attn_impl)
  ids, mask = batch()
  want_last, want_hidden = hf_outputs(ref, ids, mask)
  model = tm.from_transformers_t5(paths["single"])
  last, hidden = call_hidden(model, ids, mask)
  assert last.shape == (2, SEQ, TINY["d_model"]) and len(hidden) == len(want_hidden) == 3
  err = max_err(last, want_last)
  # the un-normalised residual stream reaches |x| ~ 25 here: its float32 round-off scales with it
  # (transformers in float32 is as far from its own float64 run)
  scaled = [max_err(h, w) / max(1.0, float(np.max(np.abs(w)))) for h, w in zip(hidden, want_hidden)]
  print(f"T5 parity vs transformers ({attn_impl}): last max abs err {err:.2e}; hidden states "
        f"max abs err / max(1, max |h|) {[f'{e:.2e}' for e in scaled]}")
  assert err <= ATOL and max(scaled) <= ATOL
  fast = tm.from_transformers_t5(paths["single"], attention="jax")
  err = max_err(call(fast, ids, mask), want_last)
  print(f"T5 parity, attention='jax': max abs err {err:.2e}")
  assert err <= ATOL


def test_padding_does_not_change_real_tokens(folders):
  model = tm.from_transformers_t5(folders[0]["single"])
  ids, mask = batch()
  padded = np.asarray(call(model, ids, mask))
  alone = np.asarray(call(model, ids[:1, :LENGTHS[0]], mask[:1, :LENGTHS[0]]))
  err = max_err(padded[0, :LENGTHS[0]], alone[0])
  print(f"T5 padded vs unpadded real tokens: max abs err {err:.2e}")
  assert err <= ATOL
  garbage = ids.copy()
  garbage[0, LENGTHS[0]:] = np.arange(3, 3 + SEQ - LENGTHS[0])
  np.testing.assert_array_equal(np.asarray(call(model, garbage, mask))[0, :LENGTHS[0]],
                                padded[0, :LENGTHS[0]])


def _grad(state, path):
  leaf = flat_state(state)[path]
  return np.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf)


def test_gradients_match_torch_autograd(folders):
  paths, ref = folders
  ids, mask = batch()
  w = np.random.default_rng(1).standard_normal((2, SEQ, TINY["d_model"])).astype(np.float32)
  w *= mask[..., None]
  ref.zero_grad()
  out = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  (out.last_hidden_state * torch.from_numpy(w)).sum().backward()
  p = dict(ref.named_parameters())
  want = {"relative_attention_bias": p[tm.RELATIVE_BIAS_KEY].grad.numpy(),
          "block.1.ff.wo.kernel": p["encoder.block.1.layer.1.DenseReluDense.wo.weight"].grad.numpy().T,
          "block.0.attention_norm.scale": p["encoder.block.0.layer.0.layer_norm.weight"].grad.numpy(),
          "shared.embedding": p["shared.weight"].grad.numpy()}
  for remat in ("none", "full"):
    grads = loss_grads(tm.from_transformers_t5(paths["single"], remat=remat), ids, mask, w)
    for path, g in want.items():
      rel = max_err(_grad(grads, path), g) / float(np.max(np.abs(g)))
      print(f"T5 grad {path} (remat={remat}): max abs err / max |grad| {rel:.2e}")
      assert rel <= 1e-5, path


def test_relative_position_buckets_match_transformers():
  for buckets, dist in ((8, 16), (32, 128)):
    q = torch.arange(301)
    want = T5Attention._relative_position_bucket(q[None, :] - q[:, None], bidirectional=True,
                                                 num_buckets=buckets, max_distance=dist)
    np.testing.assert_array_equal(relative_position_buckets(301, 301, buckets, dist), want.numpy())


def test_sharded_full_and_mesh_loads_and_export(folders):
  paths, _ = folders
  assert os.path.isfile(os.path.join(paths["sharded"], "model.safetensors.index.json"))
  ids, mask = batch()
  base = tm.from_transformers_t5(paths["single"])
  want = np.asarray(call(base, ids, mask))
  for name in ("sharded", "full"):
    np.testing.assert_array_equal(np.asarray(call(tm.from_transformers_t5(paths[name]), ids, mask)),
                                  want, err_msg=name)
  mesh, rules = make_mesh((1, 2, 4)), get_rules("fsdp_tp")  # embed over fsdp, heads/mlp over tensor
  split = tm.from_transformers_t5(paths["single"], mesh=mesh, rules=rules)
  assert tuple(split.block[0].attention.q.kernel.get_value().sharding.spec) == ("fsdp", "tensor")
  with model_context(mesh, rules):
    assert max_err(call(split, ids, mask), want) <= ATOL
  tensors = read_safetensors(os.path.join(paths["single"], "model.safetensors"))
  exported = tm.to_transformers_t5(base)
  assert sorted(exported) == sorted(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_bfloat16_is_as_close_as_transformers_bfloat16(folders):
  """bf16 compute and parameters: no further from float32 than transformers loaded in bf16 is."""
  paths, ref = folders
  ids, mask = batch()
  want, _ = hf_outputs(ref, ids, mask)
  hf16 = HFT5EncoderModel.from_pretrained(paths["single"], dtype=torch.bfloat16).eval()
  hf_err = max_err(hf_outputs(hf16, ids, mask)[0], want)
  ours = call(tm.from_transformers_t5(paths["single"], dtype=jnp.bfloat16,
                                      param_dtype=jnp.bfloat16), ids, mask)
  err = max_err(ours, want)
  print(f"T5 bf16 vs float32: ours {err:.3f}, transformers bf16 {hf_err:.3f} (max |h| "
        f"{float(np.max(np.abs(want))):.2f})")
  assert ours.dtype == jnp.bfloat16 and err <= 1.5 * hf_err


def _rewrite(src, dst, edit):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = {k: np.array(v) for k, v in read_safetensors(os.path.join(src, "model.safetensors")).items()}
  edit(tensors)
  write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  return dst


WI1 = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
Q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"
FINAL = "encoder.final_layer_norm.weight"


def _rename(t, old, new):
  t[new] = t.pop(old)


BAD_FOLDERS = {
    "removed": (lambda t: t.pop(WI1), [WI1]),
    "renamed": (lambda t: _rename(t, Q0, Q0.replace(".q.", ".query.")),
                [Q0, Q0.replace(".q.", ".query.")]),
    "reshaped": (lambda t: t.__setitem__(FINAL, t[FINAL][:-1]), [FINAL]),
    "tied_differ": (lambda t: t.__setitem__(tm.EMBEDDING_ALIAS, t[tm.EMBEDDING_KEY] + 1),
                    [tm.EMBEDDING_KEY, tm.EMBEDDING_ALIAS]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_names_the_key(folders, tmp_path, case):
  edit, keys = BAD_FOLDERS[case]
  folder = _rewrite(folders[0]["single"], str(tmp_path / case), edit)
  with pytest.raises(WeightMismatchError) as e:
    tm.from_transformers_t5(folder)
  for key in keys:
    assert re.search(re.escape(key), str(e.value)), (key, str(e.value))


def test_tied_embedding_alias(folders, tmp_path):
  """Only ``encoder.embed_tokens.weight``, or both names with equal values, load the same model."""
  single = folders[0]["single"]
  ids, mask = batch()
  want = np.asarray(call(tm.from_transformers_t5(single), ids, mask))
  edits = {"alias_only": lambda t: _rename(t, tm.EMBEDDING_KEY, tm.EMBEDDING_ALIAS),
           "both": lambda t: t.__setitem__(tm.EMBEDDING_ALIAS, t[tm.EMBEDDING_KEY].copy())}
  for name, edit in edits.items():
    model = tm.from_transformers_t5(_rewrite(single, str(tmp_path / name), edit))
    np.testing.assert_array_equal(np.asarray(call(model, ids, mask)), want, err_msg=name)


def test_other_architecture_is_refused(folders, tmp_path):
  folder = _rewrite(folders[0]["single"], str(tmp_path / "clip"), lambda t: None)
  with open(os.path.join(folder, "config.json")) as f:
    d = json.load(f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**d, "architectures": ["CLIPTextModel"]}, f)
  with pytest.raises(CheckpointArchitectureError, match="CLIPTextModel"):
    tm.from_transformers_t5(folder)


def test_xxl_key_coverage():
  """The table maps every parameter of the abstract xxl encoder, and transformers' xxl encoder
  (built on the meta device) has exactly the table's keys and shapes (plus the tied alias)."""
  cfg = T5EncoderConfig.from_hf_config(XXL)
  assert (cfg.d_model, cfg.num_layers, cfg.relative_attention_max_distance) == (4096, 24, 128)
  _, abs_state = abstract_model(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0)),
                                single_device_mesh(), get_rules("replicated"))
  params = {k: (v.get_value() if isinstance(v, nnx.Variable) else v).shape
            for k, v in flat_state(abs_state).items()}
  table = tm.t5_encoder_rules(cfg)
  assert sorted(r.target for r in table) == sorted(params)
  hf_fields = {k: v for k, v in XXL.items() if k not in ("architectures", "output_past")}
  with torch.device("meta"):
    hf = HFT5EncoderModel(T5Config(**hf_fields))
  hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  assert set(hf_shapes) == {r.source for r in table} | {tm.EMBEDDING_ALIAS}
  for r in table:
    fake = np.broadcast_to(np.zeros((), np.float32), hf_shapes[r.source])
    assert TRANSFORMS[r.transform].to_flax(fake).shape == params[r.target], r
  assert sum(int(np.prod(s)) for s in params.values()) == 4_762_310_656


def test_config_from_hf_and_validation(folders):
  with open(os.path.join(folders[0]["single"], "config.json")) as f:
    d = json.load(f)
  fields = {k: v for k, v in TINY.items() if k != "dropout_rate"}
  assert T5EncoderConfig.from_hf_config(d) == T5EncoderConfig(**fields, layer_norm_epsilon=1e-6)
  hf = T5Config()
  assert {k: getattr(hf, k) for k in HF_T5_DEFAULTS} == HF_T5_DEFAULTS
  bad = {"feed_forward_proj": "relu", "d_model": 0, "num_heads": 2.0,
         "relative_attention_num_buckets": 2, "relative_attention_max_distance": 2,
         "model_type": "mt5", "is_decoder": True}
  for field, value in bad.items():
    with pytest.raises(ValueError, match=f"'{field}'"):
      T5EncoderConfig.from_hf_config({**d, field: value})
  with pytest.raises(ValueError, match="'feed_forward_proj'"):  # T5Config's default is relu
    T5EncoderConfig.from_hf_config({k: v for k, v in d.items() if k != "feed_forward_proj"})
  with pytest.raises(ValueError, match="cudnn"):
    T5EncoderModel(T5EncoderConfig(**fields), rngs=nnx.Rngs(0), attention="cudnn")


def test_tokenizer_matches_pixart_and_feeds_the_encoder(folders, tmp_path):
  """lower().strip(), </s> appended (kept when truncating), <pad> to 120, mask = real tokens; the
  ids then give transformers' outputs at PixArt's length."""
  folder = str(tmp_path / "tok")
  raw = write_t5_tokenizer(folder)
  prompts = ["  A Photo of a CAT  ", "the red dog on the mat xyz " * 30]
  ids, mask = t5_tokenize.load_t5_tokenizer(folder)(prompts)
  assert ids.shape == mask.shape == (2, 120) and ids.dtype == mask.dtype == np.int32
  for i, p in enumerate(prompts):
    body = raw.encode(p.lower().strip(), add_special_tokens=False).ids[:119] + [1]
    np.testing.assert_array_equal(ids[i], body + [0] * (120 - len(body)))
    np.testing.assert_array_equal(mask[i], [1] * len(body) + [0] * (120 - len(body)))
  assert mask[0].sum() == 6 and mask[1].sum() == 120
  paths, ref = folders
  want, _ = hf_outputs(ref, ids, mask)
  err = max_err(call(tm.from_transformers_t5(paths["single"]), ids, mask), want)
  print(f"T5 parity at length 120 from tokenizer ids: max abs err {err:.2e}")
  assert err <= ATOL


def test_tokenizer_refuses_without_files_or_sentencepiece(tmp_path, monkeypatch):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(TokenizerFilesError, match="spiece.model"):
    t5_tokenize.load_t5_tokenizer(empty)
  spm_only = str(tmp_path / "spm")
  os.makedirs(spm_only)
  with open(os.path.join(spm_only, "spiece.model"), "wb") as f:
    f.write(b"\x00")
  monkeypatch.setattr(t5_tokenize, "_have_sentencepiece", lambda: False)
  with pytest.raises(ImportError, match="sentencepiece"):
    t5_tokenize.load_t5_tokenizer(spm_only)
