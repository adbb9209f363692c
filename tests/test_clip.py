"""CLIP (text and vision towers) against transformers and open_clip, loaders, tokenizer, modes."""
import json
import os

import numpy as np
import pytest

from tests import clip_fixtures as cf  # noqa: I001  (before transformers: torchvision workaround)
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from didr_jax.models import from_transformers
from didr_jax.models import clip_loading
from didr_jax.models.clip import l2_normalize
from didr_jax.models.clip_loading import CheckpointArchitectureError, from_open_clip
from didr_jax.text import TokenizerFilesError, load_clip_tokenizer
from didr_jax.weights import WeightFileError, WeightMismatchError
from didr_jax.weights.safetensors_io import read_safetensors, write_safetensors

pytestmark = pytest.mark.parity

# Shared jitted entry points (eager JAX compiles op by op, far slower on CPU).
call = jax.jit(lambda m, x: m(x))
call2 = jax.jit(lambda m, x, y: m(x, y))
image_grad = jax.jit(jax.grad(lambda p, m: m.encode_image(p).sum()))

TEXT_CASES = {  # name: (act, projection, legacy_eos, prefixed)
    "clip_l_like": ("quick_gelu", False, True, False),
    "clip_l_like_4x_prefix": ("quick_gelu", False, True, True),
    "bigg_like": ("gelu", True, True, False),
    "gelu_first_eos": ("gelu", False, False, False),
}


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
  out = {}
  for name, (act, proj, legacy, prefixed) in TEXT_CASES.items():
    folder = str(tmp_path_factory.mktemp(name))
    ref = cf.hf_text_model(folder, act=act, projection=proj, legacy_eos=legacy, prefixed=prefixed)
    out[name] = (folder, ref)
  return out


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_text_encoder_matches_transformers(text_models, name):
  folder, ref = text_models[name]
  ids = cf.text_ids(2, 77, pad=cf.EOS)  # EOS-padded like the SD tokenizer: first EOS pools
  with torch.no_grad():
    o = ref(torch.from_numpy(ids), output_hidden_states=True)
  ref_pooled = o.text_embeds if TEXT_CASES[name][1] else o.pooler_output
  model = from_transformers(folder)
  last, penultimate, pooled = call(model, ids)
  for got, want in ((last, o.last_hidden_state), (penultimate, o.hidden_states[-2]),
                    (pooled, ref_pooled)):
    assert got.shape == tuple(want.shape)
    assert cf.rel_err(got, want.numpy()) <= 1e-4


def test_text_encoder_zero_padding_pools_same(text_models):
  """OpenCLIP / SDXL tokenizer_2 pad with 0; the causal mask keeps the pooled EOS feature equal."""
  folder, ref = text_models["bigg_like"]
  model = from_transformers(folder)
  a = call(model, cf.text_ids(2, 77, pad=0))[2]
  b = call(model, cf.text_ids(2, 77, pad=cf.EOS))[2]
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("hf_clip"))
  return folder, cf.hf_clip_model(folder, act="gelu")


@pytest.fixture(scope="module")
def openclip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("openclip") / "open_clip.safetensors")
  return path, cf.open_clip_model(path, quick_gelu=True)


def _pixels(seed=1, batch=2):
  return np.random.default_rng(seed).standard_normal((batch, cf.IMAGE, cf.IMAGE, 3)).astype(np.float32)


def _torch_scores(ref, pixels, ids, *, hf):
  """Cosine scores and their gradient w.r.t. pixels, from the PyTorch model."""
  px = cf.nchw(pixels).requires_grad_(True)
  ids_t = torch.from_numpy(ids)
  if hf:
    img, txt = ref.get_image_features(pixel_values=px), ref.get_text_features(input_ids=ids_t)
    img, txt = img.pooler_output, txt.pooler_output
  else:
    img, txt = ref.encode_image(px), ref.encode_text(ids_t)
  cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
  cos.sum().backward()
  return img.detach().numpy(), txt.detach().numpy(), cos.detach().numpy(), px.grad.numpy()


def _check_clip(model, ref, *, hf):
  pixels, ids = _pixels(), cf.text_ids(2, 77, pad=0)
  t_img, t_txt, t_cos, t_grad = _torch_scores(ref, pixels, ids, hf=hf)

  def cos_fn(px):
    img, txt = model.encode_image(px), model.encode_text(ids)
    return jnp.sum(l2_normalize(img) * l2_normalize(txt), -1), img, txt

  cos, img, txt = jax.jit(cos_fn)(pixels)
  grad = jax.jit(jax.grad(lambda p: cos_fn(p)[0].sum()))(pixels)
  assert cf.rel_err(img, t_img) <= 1e-4
  assert cf.rel_err(txt, t_txt) <= 1e-4
  np.testing.assert_allclose(cos, t_cos, rtol=0, atol=1e-5)
  assert cf.rel_err(np.asarray(grad).transpose(0, 3, 1, 2), t_grad) <= 1e-3


def test_hf_clip_model_embeddings_scores_and_pixel_grads(hf_clip):
  folder, ref = hf_clip
  model = from_transformers(folder)
  _check_clip(model, ref, hf=True)
  pixels, ids = _pixels(), cf.text_ids(2, 77, pad=cf.EOS)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=cf.nchw(pixels)).logits_per_image
  np.testing.assert_allclose(call2(model, pixels, ids), want.numpy(), rtol=1e-5, atol=1e-4)


def test_open_clip_model_embeddings_scores_and_pixel_grads(openclip):
  path, ref = openclip
  model = from_open_clip(path, cf.openclip_config_dict(quick_gelu=True))
  _check_clip(model, ref, hf=False)
  np.testing.assert_allclose(np.asarray(model.logit_scale.get_value()), ref.logit_scale.item(), rtol=1e-6)


def test_hf_defaults_match_transformers():
  from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
  for ours, theirs in ((clip_loading.HF_TEXT_DEFAULTS, CLIPTextConfig()),
                       (clip_loading.HF_VISION_DEFAULTS, CLIPVisionConfig()),
                       (clip_loading.HF_CLIP_DEFAULTS, CLIPConfig())):
    assert ours == {k: getattr(theirs, k) for k in ours}


def test_graph_and_tree_mode_same_outputs(text_models):
  folder, _ = text_models["bigg_like"]
  ids = cf.text_ids(2, 77)
  outs = []
  for graph in (True, False):
    with nnx.set_graph_mode(graph), nnx.set_graph_updates(graph):
      model = from_transformers(folder)
      graphdef, state = nnx.split(model)
      outs.append(jax.jit(lambda s: nnx.merge(graphdef, s)(ids)[2])(state))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_remat_and_bf16_compute(hf_clip):
  folder, _ = hf_clip
  pixels = _pixels()
  base, remat = from_transformers(folder), from_transformers(folder, remat="full")
  g = [image_grad(pixels, m) for m in (base, remat)]
  np.testing.assert_allclose(g[0], g[1], rtol=1e-5, atol=1e-6)
  bf16 = from_transformers(folder, dtype=jnp.bfloat16)
  assert bf16.vision_model.encoder.layers[0].mlp.fc1.kernel.get_value().dtype == jnp.float32
  enc = jax.jit(lambda m, x: m.encode_image(x).astype(jnp.float32))
  assert cf.rel_err(enc(bf16, pixels), enc(base, pixels)) < 5e-2


def test_sharded_load_fsdp(hf_clip):
  from didr_jax.sharding import get_rules, make_mesh
  folder, _ = hf_clip
  mesh = make_mesh((1, 8, 1))
  model = from_transformers(folder, mesh=mesh, rules=get_rules("fsdp"))
  fc1 = model.vision_model.encoder.layers[0].mlp.fc1.kernel.get_value()  # (32, 37): embed on fsdp
  assert fc1.sharding.spec[0] == "fsdp"
  assert fc1.addressable_shards[0].data.shape == (4, 37)


def test_architecture_and_weight_errors(tmp_path, text_models):
  folder, _ = text_models["clip_l_like"]
  bad = tmp_path / "unet"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
  with pytest.raises(CheckpointArchitectureError, match="UNet2DConditionModel.*from_diffusers"):
    from_transformers(str(bad))
  (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  with pytest.raises(CheckpointArchitectureError, match="BertModel"):
    from_transformers(str(bad))
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_transformers(str(tmp_path))

  # A missing and a mis-shaped key: every offender is named.
  broken = tmp_path / "broken"
  broken.mkdir()
  cfg = json.load(open(os.path.join(folder, "config.json")))
  (broken / "config.json").write_text(json.dumps(cfg))
  tensors = {k: np.asarray(v) for k, v in read_safetensors(os.path.join(folder, "model.safetensors")).items()}
  del tensors["encoder.layers.1.mlp.fc2.bias"]
  tensors["final_layer_norm.weight"] = np.zeros(3, np.float32)
  write_safetensors(str(broken / "model.safetensors"), tensors)
  with pytest.raises(WeightMismatchError, match=r"encoder.layers.1.mlp.fc2.bias(.|\n)*final_layer_norm.weight"):
    from_transformers(str(broken))
  # Config of another width than the weights (another architecture): mis-shaped keys.
  (broken / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "intermediate_size": 64}))
  write_safetensors(str(broken / "model.safetensors"), {**tensors, "encoder.layers.1.mlp.fc2.bias": np.zeros(16, np.float32)})
  with pytest.raises(WeightMismatchError, match="mis-shaped"):
    from_transformers(str(broken))
  # Pickles are refused, naming the converter.
  os.remove(broken / "model.safetensors")
  (broken / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
  with pytest.raises(WeightFileError, match="didr_jax.convert"):
    from_transformers(str(broken))


def test_open_clip_loader_rejects_other_checkpoints(tmp_path, hf_clip, openclip):
  folder, _ = hf_clip
  with pytest.raises(CheckpointArchitectureError, match="visual.conv1.weight"):
    from_open_clip(os.path.join(folder, "model.safetensors"), cf.openclip_config_dict())
  path, _ = openclip
  with pytest.raises(WeightMismatchError, match="mis-shaped"):
    from_open_clip(path, {**cf.OPENCLIP_CFG, "embed_dim": 8})
  with pytest.raises(ValueError, match="attentional_pool"):
    from_open_clip(path, {**cf.OPENCLIP_CFG, "vision_cfg": {"attentional_pool": True}})
  with pytest.raises(ValueError, match="unknown"):
    from_open_clip(path, "ViT-Q-99")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
  return cf.tokenizer_folder(str(tmp_path_factory.mktemp("tok")))


def test_tokenizer_matches_open_clip(tokenizer_folder):
  oc = cf.clip_torch_env.open_clip()
  prompts = ["A photo of a Cat!!", 'an astronaut riding a horse, "highly" detailed, 4k',
             "x " * 100, "", "héllo wörld"]
  tok = load_clip_tokenizer(tokenizer_folder)
  ids = tok(prompts)
  assert ids.dtype == np.int32 and ids.shape == (5, 77)
  want = oc.tokenize(prompts).numpy()
  first_eos = np.argmax(ids == 49407, axis=1)
  np.testing.assert_array_equal(first_eos, np.argmax(want, axis=1))
  for row, n in enumerate(first_eos):  # EOS padding here, 0 in open_clip: compare up to EOS
    np.testing.assert_array_equal(ids[row, :n + 1], want[row, :n + 1])
  assert load_clip_tokenizer(tokenizer_folder, pad_token="!")(["a"])[0, -1] == 0


def test_tokenizer_missing_files(tmp_path, tokenizer_folder):
  with pytest.raises(TokenizerFilesError, match="not found"):
    load_clip_tokenizer(str(tmp_path / "nope"))
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(TokenizerFilesError, match="merges.txt"):
    load_clip_tokenizer(str(tmp_path))


def test_vision_model_with_projection_matches_transformers(tmp_path):
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
  torch.manual_seed(0)
  ref = CLIPVisionModelWithProjection(CLIPVisionConfig(
      image_size=cf.IMAGE, patch_size=cf.PATCH, hidden_size=32, intermediate_size=37,
      num_hidden_layers=2, num_attention_heads=4, projection_dim=16, hidden_act="quick_gelu")).eval()
  ref.save_pretrained(str(tmp_path))
  pixels = _pixels()
  with torch.no_grad():
    want = ref(pixel_values=cf.nchw(pixels))
  last, embeds = call(from_transformers(str(tmp_path)), pixels)
  assert cf.rel_err(embeds, want.image_embeds.numpy()) <= 1e-4
  assert cf.rel_err(last, want.last_hidden_state.numpy()) <= 1e-4
