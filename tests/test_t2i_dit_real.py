"""The real (non-tiny) PixArt and Z-Image configs over on-disk folders of tiny models: validation
passes, the loaders run (transformer, VAE, the text encoder dispatched on its config.json, the
folder's tokenizer with its chat template), and generator + VAE + reward give finite scores; bad
folders fail validation with one line naming the field and the file."""
import json
import os
import shutil

import numpy as np
import pytest

from configs import pixart, zimage
from didr_jax import sharding
from didr_jax.errors import ConfigError
from didr_jax.pipelines import validate
from didr_jax.pipelines.t2i import T2I
from tests import dit_real_folder

pytestmark = pytest.mark.parity
CONFIGS = {"pixart": pixart, "zimage": zimage}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folders(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"real_{request.param}")
  ref, reward = dit_real_folder.write_dit_folders(str(root), request.param)
  prompts = str(root / "prompts.txt")
  with open(prompts, "w") as f:
    f.write("a photo of a cat\na red sofa\n")
  return request.param, ref, reward, prompts


def _config(folders, reference=None):
  name, ref, reward, prompts = folders
  cfg = CONFIGS[name].get_config("")
  cfg.model.reference, cfg.reward.path, cfg.data.prompts = reference or ref, reward, prompts
  cfg.model.dtype, cfg.model.remat, cfg.data.resolution, cfg.align.batch = "float32", "none", 16, 8
  return cfg


def test_real_run_loaders_on_disk_folders(folders):
  name, ref, _, _ = folders
  cfg = _config(folders)
  cfg.model.generator = os.path.join(ref, "transformer")
  validate.validate(cfg)
  pipe = T2I(cfg)
  cond, z = pipe.eval_inputs(["a photo of a cat", "a red sofa"], 0)
  length = {"pixart": 120, "zimage": 512}[name]
  assert cond["context"].shape == (2, length, 32) and cond["mask"].shape == (2, length)
  assert 2 <= int(sharding.to_host(cond["mask"]).sum(1).min()) < length
  _, rewards = pipe.eval_fn()(pipe.gen_init, pipe.frozen(), cond, z)
  assert np.isfinite(sharding.to_host(rewards)).all()


def _copy(folders, tmp_path):
  dst = str(tmp_path / "ref")
  shutil.copytree(folders[1], dst)
  return dst


def _expect(cfg, pattern):
  with pytest.raises(ConfigError, match=pattern) as err:
    validate.validate(cfg)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("sub, content, pattern", [
    ("transformer", {"_class_name": "UNet2DConditionModel"},
     r"transformer: _class_name 'UNet2DConditionModel', expected '\w+Transformer2DModel'"),
    ("text_encoder", {"model_type": "clip_text_model"},
     r"text_encoder: a clip text encoder; backbone '\w+' reads (t5|qwen3)$"),
])
def test_a_folder_of_another_model_is_named(folders, tmp_path, sub, content, pattern):
  ref = _copy(folders, tmp_path)
  with open(os.path.join(ref, sub, "config.json"), "w") as f:
    json.dump(content, f)
  _expect(_config(folders, ref), r"^config\.model\.reference: .*" + pattern)


def test_missing_tokenizer_file_and_transformer_folder_are_named(folders, tmp_path):
  ref = _copy(folders, tmp_path)
  os.remove(os.path.join(ref, "tokenizer", "tokenizer.json"))
  _expect(_config(folders, ref), r"^config\.model\.reference: .*tokenizer: tokenizer file "
                                 r"tokenizer\.json.* missing")
  shutil.rmtree(os.path.join(ref, "transformer"))
  _expect(_config(folders, ref), r"^config\.model\.reference: .*transformer/ missing; expected a "
                                 r"diffusers folder with transformer/, vae/, text_encoder/, tokenizer/")


def test_a_scheduler_with_other_betas_is_named(folders, tmp_path):
  """PixArt trains on its linear betas: a reference shipping other betas is refused. Z-Image's time
  shift is the config's (model.time_shift: the base model's scheduler says 6, Turbo's 3), so a
  scheduler with another shift validates."""
  name = folders[0]
  ref = _copy(folders, tmp_path)
  path = os.path.join(ref, "scheduler", "scheduler_config.json")
  change = {"pixart": {"beta_schedule": "scaled_linear"}, "zimage": {"shift": 6.0}}[name]
  with open(path, "w") as f:
    json.dump(dict(dit_real_folder.SCHEDULERS[name], **change), f)
  if name == "zimage":
    validate.validate(_config(folders, ref))
    return
  _expect(_config(folders, ref), r"^config\.model\.reference: .*scheduler_config\.json: "
                                 r"beta_schedule='scaled_linear', but backbone 'pixart' trains on 'linear'")


def test_a_prompt_longer_than_the_text_encoder_reads_is_named(folders, tmp_path):
  """T5 reads 120 tokens, Qwen3 512 (the pipelines' limits): a longer prompt is refused, not cut."""
  name = folders[0]
  cfg = _config(folders)
  path = tmp_path / "prompts.txt"
  path.write_text("a cat\n" + " ".join(["cat"] * {"pixart": 130, "zimage": 600}[name]) + "\n")
  cfg.data.prompts = str(path)
  _expect(cfg, r"^config\.data\.prompts: prompt 1 \('cat cat .*'\.\.\.\) has \d+ tokens; the "
               r"(t5 tokenizer keeps 120|qwen3 tokenizer keeps 512) \(1 prompt\(s\) too long\)")
