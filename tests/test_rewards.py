"""Rewards on tiny random CLIP models: parity with PyTorch (scores and pixel gradients), finite
differences, the weighted sum, named errors, NNX graph/tree mode (the real aesthetic head:
benchmarks/real_aesthetic_head.py)."""
import functools
import os

import numpy as np
import pytest

from tests import clip_fixtures as cf  # noqa: I001  (before transformers: torchvision workaround)
from tests import reward_imagereward as ri
from tests import reward_torch as rt
import torch

import jax
from flax import nnx

from didr_jax import rewards
from didr_jax.models.clip_loading import CheckpointArchitectureError
from didr_jax.text import TokenizerFilesError
from didr_jax.weights.safetensors_io import write_safetensors

pytestmark = pytest.mark.parity

PROMPTS = ["a photo of a red cat", "an astronaut riding a horse on the moon"]
# name: (score kind of the torch reference, preprocessing mode, input height, width)
CASES = {"aesthetic": ("aesthetic", "crop", 40, 40), "pickscore": ("logit", "crop", 48, 40),
         "clipscore": ("clipscore", "crop", 36, 52), "hpsv2": ("cosine", "pad", 40, 24),
         "hpsv2.1": ("cosine", "pad", 24, 40), "imagereward": ("imagereward", "crop", 40, 36)}


@functools.partial(jax.jit, static_argnums=0)
def scores_and_grad(reward, params, images, ids):
  """One compile per reward and image shape, shared by the parity and finite-difference tests."""
  def total(x):
    scores = reward.apply(params, x, ids)
    return scores.sum(), scores
  (_, scores), grad = jax.value_and_grad(total, has_aux=True)(images)
  return scores, grad


def _head_tensors(mlp):
  return {k: v.detach().numpy() for k, v in mlp.state_dict().items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rewards")
  tok = cf.tokenizer_folder(str(root / "tok"))
  gelu = cf.hf_clip_model(str(root / "pick"), act="gelu", vocab=cf.REAL_VOCAB, eos=cf.REAL_EOS,
                          logit_scale=float(np.log(100.0)))
  quick = cf.hf_clip_model(str(root / "openai"), act="quick_gelu", vocab=cf.REAL_VOCAB,
                           eos=cf.REAL_EOS, seed=1)
  oc = cf.open_clip_model(str(root / "hps.safetensors"), vocab=cf.REAL_VOCAB, seed=2)
  torch.manual_seed(3)
  head = rt.aesthetic_mlp(16)
  write_safetensors(str(root / "head.safetensors"), _head_tensors(head))
  oc_cfg = cf.openclip_config_dict(vocab=cf.REAL_VOCAB)
  ir_ref = ri.build(str(root / "imagereward"))
  kw = {"aesthetic": dict(path=str(root / "head.safetensors"), clip=str(root / "openai")),
        "pickscore": dict(path=str(root / "pick"), tokenizer=tok),
        "clipscore": dict(path=str(root / "openai"), tokenizer=tok),
        "hpsv2": dict(path=str(root / "hps.safetensors"), tokenizer=tok, config=oc_cfg),
        "hpsv2.1": dict(path=str(root / "hps.safetensors"), tokenizer=tok, config=oc_cfg),
        "imagereward": dict(path=str(root / "imagereward" / "ImageReward.safetensors"),
                            vision=ri.vision_config())}
  refs = {"aesthetic": (quick, True), "pickscore": (gelu, True), "clipscore": (quick, True),
          "hpsv2": (oc, False), "hpsv2.1": (oc, False), "imagereward": (ir_ref, None)}
  loaded = {name: rewards.load(name, **kw[name]) for name in CASES}
  return dict(root=root, tok=tok, kw=kw, refs=refs, head=head, rewards=loaded)


def _images(h, w, seed=0, batch=2):
  return np.random.default_rng(seed).uniform(-0.9, 0.9, (batch, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_reward_matches_torch_scores_and_pixel_grads(setup, name):
  kind, mode, h, w = CASES[name]
  reward = setup["rewards"][name]
  images = _images(h, w)
  ids = None if kind == "aesthetic" else reward.tokenize(PROMPTS)
  model, hf = setup["refs"][name]
  if name == "imagereward":
    x = cf.nchw(images).requires_grad_(True)
    scores = model.score(x, ids)
    scores.sum().backward()
    want, want_grad = scores.detach().numpy(), x.grad.numpy().transpose(0, 2, 3, 1)
  else:
    want, want_grad = rt.score_and_grad(kind, model, images, ids, hf=hf, mode=mode, head=setup["head"])
  got, grad = scores_and_grad(reward, reward.params, images, ids)
  assert got.shape == (2,)
  assert cf.rel_err(got, want) <= 1e-4, (got, want)
  assert cf.rel_err(grad, want_grad) <= 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_reward_grad_matches_finite_differences(setup, name):
  _, _, h, w = CASES[name]
  reward = setup["rewards"][name]
  images = _images(h, w, seed=5)
  ids = None if name == "aesthetic" else reward.tokenize(PROMPTS)
  f = lambda x: float(scores_and_grad(reward, reward.params, x, ids)[0].sum())
  grad = np.asarray(scores_and_grad(reward, reward.params, images, ids)[1])
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  # Direction: the gradient's sign pattern with random magnitudes, so the directional derivative
  # stands well above float32 round-off (a random direction averages to ~0 on tiny models).
  v = (np.sign(grad) * np.random.default_rng(6).uniform(0.5, 1.0, images.shape)).astype(np.float32)
  eps = 3e-3  # pixels stay inside (-1, 1): the clamp is inactive
  fd = (f(images + eps * v) - f(images - eps * v)) / (2 * eps)
  np.testing.assert_allclose(fd, float(np.sum(grad * v)), rtol=5e-3)  # measured <= 3.3e-4


def test_public_call_strings_ids_broadcast_and_jit(setup):
  """reward(images, prompts) with strings, with ids, with one prompt for all, inside jit(grad)."""
  reward = setup["rewards"]["hpsv2"]
  images = _images(40, 24)
  ids = reward.tokenize(PROMPTS[:1])
  g = jax.jit(jax.grad(lambda x: reward(x, ids).sum()))(images)
  assert np.isfinite(g).all()
  by_ids = reward(images, ids)
  np.testing.assert_allclose(by_ids, reward(images, [PROMPTS[0]] * 2), rtol=1e-6)
  np.testing.assert_allclose(by_ids, scores_and_grad(reward, reward.params, images,
                                                     np.repeat(ids, 2, 0))[0], rtol=1e-5)


def test_weighted_sum(setup):
  loaded, kw = setup["rewards"], setup["kw"]
  total = rewards.WeightedReward({"hpsv2": (2.0, loaded["hpsv2"]), "aesthetic": (0.5, loaded["aesthetic"])})
  images = _images(40, 24)
  terms = total.terms(images, PROMPTS)
  np.testing.assert_allclose(total(images, PROMPTS), 2.0 * terms["hpsv2"] + 0.5 * terms["aesthetic"],
                             rtol=1e-6)
  g = jax.jit(jax.grad(lambda x: total(x, PROMPTS).sum()))(images)
  want = 2.0 * scores_and_grad(loaded["hpsv2"], loaded["hpsv2"].params, images,
                               loaded["hpsv2"].tokenize(PROMPTS))[1]
  want += 0.5 * scores_and_grad(loaded["aesthetic"], loaded["aesthetic"].params, images, None)[1]
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
  built = rewards.load_weighted([dict(name="hpsv2.1", weight=1.0, **kw["hpsv2.1"])])
  assert list(built.rewards) == ["hpsv2.1"] and built.rewards["hpsv2.1"][0] == 1.0
  with pytest.raises(ValueError, match="weight"):
    rewards.load_weighted([dict(name="hpsv2", **kw["hpsv2"])])


def test_graph_and_tree_mode(setup):
  kw = setup["kw"]
  images = _images(32, 32)
  outs = []
  for graph in (True, False):
    with nnx.set_graph_mode(graph), nnx.set_graph_updates(graph):
      outs.append(np.asarray(rewards.load("pickscore", **kw["pickscore"])(images, PROMPTS)))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)


def test_bad_inputs_named_errors(setup, tmp_path):
  reward, kw = setup["rewards"]["pickscore"], setup["kw"]
  good = _images(32, 32)
  with pytest.raises(rewards.ImageInputError, match=r"\[-1, 1\]"):
    reward(good * 127.5 + 127.5, PROMPTS)
  with pytest.raises(rewards.ImageInputError, match="uint8|dtype"):
    reward(np.zeros((2, 32, 32, 3), np.uint8), PROMPTS)
  with pytest.raises(rewards.ImageInputError, match="NHWC"):
    reward(good.transpose(0, 3, 1, 2), PROMPTS)
  with pytest.raises(ValueError, match="3 prompts for 2 images"):
    reward(good, PROMPTS + ["x"])
  with pytest.raises(ValueError, match="unknown"):
    rewards.load("mps", kw["pickscore"]["path"])
  with pytest.raises(TokenizerFilesError, match="merges.txt"):  # folder without tokenizer files
    rewards.load("pickscore", kw["pickscore"]["path"])
  with pytest.raises(CheckpointArchitectureError, match="visual.conv1.weight"):  # HF file as HPS
    rewards.load("hpsv2", os.path.join(kw["pickscore"]["path"], "model.safetensors"),
                 tokenizer=setup["tok"], config=kw["hpsv2"]["config"])
  with pytest.raises(CheckpointArchitectureError, match="aesthetic head"):  # CLIP file as head
    rewards.load("aesthetic", kw["hpsv2"]["path"], clip=kw["aesthetic"]["clip"])
  ir = kw["imagereward"]
  with pytest.raises(CheckpointArchitectureError, match="not an ImageReward checkpoint"):
    rewards.load("imagereward", kw["hpsv2"]["path"], med_config=os.path.join(os.path.dirname(ir["path"]),
                 "med_config.json"), tokenizer=os.path.dirname(ir["path"]), vision=ir["vision"])
  with pytest.raises(TokenizerFilesError, match="vocab.txt"):
    rewards.load("imagereward", ir["path"], tokenizer=str(tmp_path), vision=ir["vision"])
