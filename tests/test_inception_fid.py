"""FID InceptionV3 and FID math against pytorch-fid 0.3.0 and clean-fid (float32 CPU).

The Inception runs with random weights and random BatchNorm statistics: pytorch-fid's own
``InceptionV3`` is built with its weight download replaced by a random ``fid_inception_v3`` state
dict, which goes through our .pth converter and loader. Every check compares with the torch /
clean-fid reference, never with our own output.
"""
import importlib.metadata
from types import SimpleNamespace

import jax
import numpy as np
import pytest

# Importing torch through clip_torch_env runs its torchvision workaround (CPU torch) first.
from tests.clip_torch_env import torch
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

if not hasattr(torchvision, "__version__"):   # clip_torch_env's stand-in package; pytorch-fid reads it
  torchvision.__version__ = importlib.metadata.version("torchvision")

from cleanfid.resize import make_resizer  # noqa: E402
from pytorch_fid import inception as pf_inception  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path  # noqa: E402

from didr_jax.metrics.fid import (clean_resize, feature_statistics, frechet_distance,  # noqa: E402
                                  load_statistics, save_statistics)
from didr_jax.models.inception import resize_bilinear_torch  # noqa: E402
from didr_jax.convert import convert_file  # noqa: E402
from didr_jax.models.inception_mapping import (ALLOWED_UNUSED,  # noqa: E402
                                               inception_rules, load_inception)
from didr_jax.weights import WeightMismatchError, read_safetensors, write_safetensors  # noqa: E402

pytestmark = pytest.mark.parity

FEATURE_TOL = 1e-4


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def random_fid_state(seed: int) -> dict:
  """``fid_inception_v3()``'s state dict with random weights and BN statistics, no download:
  its weight fetch and strict load are stubbed while it builds the architecture."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: None)
    mp.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda *a, **k: None)
    net = pf_inception.fid_inception_v3()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.2, generator=g)
        m.running_mean.normal_(0.0, 0.2, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, torch.nn.Linear):
        m.weight.normal_(0.0, 0.01, generator=g)
        m.bias.normal_(0.0, 0.01, generator=g)
  return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def fid_nets(tmp_path_factory):
  state = random_fid_state(0)
  folder = tmp_path_factory.mktemp("inception")
  pth = str(folder / "pt_inception-random.pth")
  torch.save(state, pth)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)
    ref_net = pf_inception.InceptionV3([3], resize_input=True, normalize_input=True,
                                       use_fid_inception=True).eval()
  images = np.random.default_rng(1).uniform(0.0, 1.0, (2, 75, 93, 3)).astype(np.float32)
  with torch.no_grad():
    ref = ref_net(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0].reshape(2, -1).numpy()
  sft = convert_file(pth, str(folder / "pt_inception-random.safetensors"))
  model = load_inception(sft)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, images))
  return SimpleNamespace(state=state, pth=pth, safetensors=sft, ref=ref, ours=ours)


def test_pool3_features_match_pytorch_fid(fid_nets):
  err = rel_err(fid_nets.ours, fid_nets.ref)
  print(f"pool3 features: max|ours - ref| / max|ref| = {err:.2e} (scale {np.abs(fid_nets.ref).max():.3g})")
  assert fid_nets.ours.shape == fid_nets.ref.shape == (2, 2048)
  assert fid_nets.ours.dtype == np.float32
  assert err <= FEATURE_TOL


def test_table_names_every_checkpoint_key(fid_nets):
  """Rule sources plus the allow-list are exactly fid_inception_v3()'s state-dict keys."""
  sources = [r.source for r in inception_rules()]
  assert len(sources) == len(set(sources)) == 94 * 5
  assert set(sources) | ALLOWED_UNUSED == set(fid_nets.state)
  assert not set(sources) & ALLOWED_UNUSED


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshaped"])
@pytest.mark.parametrize("entry", ["safetensors", "converted_pth"])
def test_weight_mismatch_names_the_key(fid_nets, tmp_path, case, entry):
  key = {"missing": "Mixed_6c.branch7x7_2.conv.weight", "unexpected": "Mixed_6c.extra.weight",
         "misshaped": "Mixed_7b.branch_pool.bn.running_var"}[case]
  tensors = {k: np.array(v) for k, v in read_safetensors(fid_nets.safetensors).items()}
  if case == "missing":
    del tensors[key]
  elif case == "unexpected":
    tensors[key] = np.zeros((3,), np.float32)
  else:
    tensors[key] = np.ones((191,), np.float32)
  path = str(tmp_path / "bad.safetensors")
  if entry == "safetensors":
    write_safetensors(path, tensors)
  else:   # the pickle through python -m didr_jax.convert, then loaded
    pth = str(tmp_path / "bad.pth")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, pth)
    convert_file(pth, path)
  with pytest.raises(WeightMismatchError, match=key.replace(".", r"\.")):
    load_inception(path)


@pytest.mark.parametrize("hw", [(75, 93), (331, 400), (299, 299), (17, 600)])
def test_resize_matches_torch_bilinear(hw):
  x = np.random.default_rng(hw[0]).uniform(0, 1, (2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299),
                        mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(resize_bilinear_torch(x, 299))
  err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
  print(f"bilinear resize {hw} -> 299: max abs error {err:.2e}")
  assert ours.shape == ref.shape and err <= 1e-6


def _two_feature_sets(n, d, seed):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((n, d))
  b = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d))) + 0.5
  return a, b


@pytest.mark.parametrize("n,d", [(200, 16), (10, 32)])   # full rank; rank-deficient (N < D)
def test_frechet_distance_matches_pytorch_fid(n, d):
  a, b = _two_feature_sets(n, d, seed=n)
  mu1, s1 = feature_statistics(a)
  mu2, s2 = feature_statistics(b)
  for f, mu, s in ((a, mu1, s1), (b, mu2, s2)):
    np.testing.assert_allclose(mu, np.mean(f, axis=0), rtol=1e-12)
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), rtol=1e-12)
  ours = frechet_distance(mu1, s1, mu2, s2)
  ref = calculate_frechet_distance(mu1, s1, mu2, s2)
  print(f"FID n={n} d={d}: ours {ours:.10g}, pytorch-fid {ref:.10g}")
  assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_fid_of_a_set_with_itself_is_zero():
  a, _ = _two_feature_sets(200, 16, seed=3)
  mu, sigma = feature_statistics(a)
  scale = float(np.trace(sigma))
  ours = frechet_distance(mu, sigma, mu, sigma)
  ref = calculate_frechet_distance(mu, sigma, mu, sigma)
  assert abs(ref) < 1e-6 * scale
  assert abs(ours) < 1e-6 * scale and abs(ours - ref) < 1e-6 * scale


def test_statistics_round_trip_through_pytorch_fid(tmp_path):
  a, _ = _two_feature_sets(50, 8, seed=4)
  mu, sigma = feature_statistics(a)
  path = str(tmp_path / "stats.npz")
  save_statistics(path, mu, sigma)
  ref_mu, ref_sigma = compute_statistics_of_path(path, None, 1, 8, "cpu")
  np.testing.assert_array_equal(ref_mu, mu)
  np.testing.assert_array_equal(ref_sigma, sigma)
  got_mu, got_sigma = load_statistics(path)
  np.testing.assert_array_equal(got_mu, ref_mu)
  np.testing.assert_array_equal(got_sigma, ref_sigma)


def test_load_statistics_names_a_missing_sigma(tmp_path):
  path = str(tmp_path / "no_sigma.npz")
  np.savez_compressed(path, mu=np.zeros(4))
  with pytest.raises(ValueError, match=r"no_sigma\.npz.*'sigma'"):
    load_statistics(path)
  bad = str(tmp_path / "bad_shape.npz")
  np.savez_compressed(bad, mu=np.zeros(4), sigma=np.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"bad_shape\.npz.*\(4, 3\)"):
    load_statistics(bad)


@pytest.mark.parametrize("shape", [(2, 37, 53, 3), (1, 320, 410, 3)])
def test_clean_resize_matches_cleanfid(shape):
  images = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
  resizer = make_resizer("PIL", False, "bicubic", (299, 299))
  ref = np.stack([resizer(img) for img in images])
  ours = clean_resize(images)
  err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
  print(f"clean resize {shape[1:3]} -> 299: max abs error {err:.2e}")
  assert ours.dtype == np.float32 and ours.shape == ref.shape == (shape[0], 299, 299, 3)
  assert err <= 1e-4
  np.testing.assert_array_equal(clean_resize(images[0]), ours[0])
