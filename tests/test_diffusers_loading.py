"""from_diffusers error reporting, sharded placement on an 8-device FSDP mesh, the orbax cache,
and the export / convert CLIs."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import torch  # noqa: E402
from flax import nnx  # noqa: E402

from tests import torch_refs as R  # noqa: I001  (before diffusers: torchvision workaround)
from didr_jax.models import diffusers_loading, from_diffusers
from didr_jax.sharding import make_mesh
from didr_jax.weights import (
    WeightFileError, WeightMismatchError, flat_state, read_safetensors, write_safetensors)

pytestmark = pytest.mark.parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
  tm = R.build_unet(R.SD15_TINY, seed=4)
  folder = tmp_path_factory.mktemp("unet")
  tm.save_pretrained(folder)
  return str(folder), tm


@pytest.fixture(scope="module")
def mesh8():
  return make_mesh((1, 8, 1))


def _copy(folder, tmp_path, edit=None):
  """Copy a diffusers folder, rewriting its tensors through ``edit(dict) -> dict``."""
  out = tmp_path / "copy"
  shutil.copytree(folder, out)
  if edit is not None:
    tensors = {k: np.asarray(v) for k, v in read_safetensors(str(out / WEIGHTS)).items()}
    write_safetensors(str(out / WEIGHTS), edit(tensors))
  return str(out)


def _flat_params(model):
  return {k: v.get_value() for k, v in flat_state(nnx.state(model, nnx.Param)).items()}


KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def test_sharded_safetensors_with_index_load(unet_folder, tmp_path):
  """diffusers' sharded layout (index json + several files) loads to the same parameters."""
  folder = str(tmp_path / "sharded")
  unet_folder[1].save_pretrained(folder, max_shard_size="300KB")
  assert os.path.isfile(os.path.join(folder, WEIGHTS + ".index.json"))
  assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 1
  a, b = _flat_params(from_diffusers(folder)), _flat_params(from_diffusers(unet_folder[0]))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_missing_key_is_named(unet_folder, tmp_path):
  folder = _copy(unet_folder[0], tmp_path, lambda t: {k: v for k, v in t.items() if k != KEY})
  with pytest.raises(WeightMismatchError, match=r"keys missing from the weights \(1\): " + KEY):
    from_diffusers(folder)


def test_wrong_shape_and_unused_keys_are_named(unet_folder, tmp_path):
  def edit(t):
    t[KEY] = np.zeros((3, 5), np.float32)
    t["extra.weight"] = np.zeros(2, np.float32)
    return t
  with pytest.raises(WeightMismatchError) as e:
    from_diffusers(_copy(unet_folder[0], tmp_path, edit))
  msg = str(e.value)
  assert f"mis-shaped keys (key: file shape -> expected) (1): {KEY}: (3, 5) -> (32, 16)" in msg
  assert "unused keys in the weights (1): extra.weight" in msg


def test_truncated_safetensors_is_named(unet_folder, tmp_path):
  folder = _copy(unet_folder[0], tmp_path)
  path = os.path.join(folder, WEIGHTS)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(WeightFileError, match=f"{path}: truncated file: tensor"):
    from_diffusers(folder)


def test_pickle_is_refused_with_the_convert_command(unet_folder, tmp_path):
  folder = _copy(unet_folder[0], tmp_path)
  os.remove(os.path.join(folder, WEIGHTS))
  torch.save(unet_folder[1].state_dict(), os.path.join(folder, "diffusion_pytorch_model.bin"))
  with pytest.raises(WeightFileError, match=r"pickled checkpoints are never loaded.*"
                                            r"python -m didr_jax\.convert"):
    from_diffusers(folder)


def test_config_errors_are_named(unet_folder, tmp_path):
  folder = _copy(unet_folder[0], tmp_path)
  config_path = os.path.join(folder, "config.json")
  config = json.load(open(config_path))
  json.dump({**config, "_class_name": "UNet3DConditionModel"}, open(config_path, "w"))
  with pytest.raises(ValueError, match="_class_name 'UNet3DConditionModel' is not supported"):
    from_diffusers(folder)
  json.dump({**config, "class_embed_type": "timestep"}, open(config_path, "w"))
  with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
    from_diffusers(folder)
  os.remove(config_path)
  with pytest.raises(WeightFileError, match="no config.json"):
    from_diffusers(folder)


def test_fsdp_load_places_one_eighth_per_device_and_runs(unet_folder, mesh8):
  """Loaded onto an 8-way FSDP mesh: each device holds ~1/8 of the bytes; output matches torch."""
  model = from_diffusers(unet_folder[0], mesh=mesh8, rules="fsdp")
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  total = sum(x.nbytes for x in leaves)
  per_device = {d: 0 for d in mesh8.devices.flat}
  for x in leaves:
    for shard in x.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  fractions = [b / total for b in per_device.values()]
  print(f"FSDP x8: total {total} B, per-device fraction {min(fractions):.3f}-{max(fractions):.3f}")
  assert max(fractions) <= 0.2
  inputs = R.unet_inputs(R.SD15_TINY)
  out = np.asarray(jax.jit(lambda m, i: m(**i))(model, inputs))
  with torch.no_grad():
    ref = R.nhwc(R.torch_unet_call(unet_folder[1], inputs))
  assert R.rel_err(out, ref) <= 1e-4


def test_orbax_cache_round_trip(unet_folder, mesh8, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  first = from_diffusers(unet_folder[0], cache_dir=cache, mesh=mesh8, rules="fsdp")
  (entry,) = os.listdir(cache)
  assert diffusers_loading.is_cache_entry(os.path.join(cache, entry))

  def no_safetensors(*_):
    raise AssertionError("second load must come from the orbax cache")
  monkeypatch.setattr(diffusers_loading, "load_tensors", no_safetensors)
  second = from_diffusers(unet_folder[0], cache_dir=cache, mesh=mesh8, rules="fsdp")
  a, b = _flat_params(first), _flat_params(second)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].sharding == b[k].sharding, k
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)

  # The export CLI turns the cache entry back into a diffusers folder equal to the original.
  out = str(tmp_path / "exported")
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "didr_jax.export",
                         f"--input={os.path.join(cache, entry)}", f"--output={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  original = read_safetensors(os.path.join(unet_folder[0], WEIGHTS))
  exported = read_safetensors(os.path.join(out, WEIGHTS))
  assert original.keys() == exported.keys()
  for k in original:
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
  assert json.load(open(os.path.join(out, "config.json")))["_class_name"] == "UNet2DConditionModel"


def test_convert_cli_turns_a_pickle_into_loadable_safetensors(unet_folder, tmp_path):
  folder = _copy(unet_folder[0], tmp_path)
  os.remove(os.path.join(folder, WEIGHTS))
  pickle_path = os.path.join(folder, "diffusion_pytorch_model.bin")
  torch.save({"state_dict": unet_folder[1].state_dict(), "global_step": 7}, pickle_path)
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "didr_jax.convert", f"--input={pickle_path}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  os.remove(pickle_path)
  converted = read_safetensors(os.path.join(folder, WEIGHTS))
  for k, v in unet_folder[1].state_dict().items():
    np.testing.assert_array_equal(converted[k], v.numpy(), err_msg=k)
  from_diffusers(folder)  # loads through the mapping table


def test_convert_keeps_bfloat16_and_rejects_non_tensors(tmp_path):
  from didr_jax.convert import convert_file
  src = str(tmp_path / "x.pt")
  w = torch.randn(3, 4).to(torch.bfloat16)
  torch.save({"w": w, "b": torch.arange(3.0)}, src)
  out = read_safetensors(convert_file(src))
  np.testing.assert_array_equal(out["w"].astype(np.float32), w.float().numpy())
  assert str(out["w"].dtype) == "bfloat16"
  torch.save({"w": w, "step": 3}, src)
  with pytest.raises(ValueError, match=r"not tensors: \['step \(int\)'\]"):
    convert_file(src)
