"""One validation per experiment, before anything is built: every enum and range of the toy and
t2i configs fails with one ConfigError line that names the field (the digits fields are in
tests/test_digits_metrics.py)."""
import pytest

from didr_jax.errors import ConfigError


def _set(cfg, field, value):
  *path, key = field.split(".")
  group = cfg
  for k in path:
    group = group[k]
  with cfg.unlocked():
    group[key] = value


def _expect_one_line(validate, cfg, field):
  with pytest.raises(ConfigError, match=rf"^config\.{field}[: ]") as err:
    validate(cfg)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("method", "dmd"), ("objective.weighting", "dmd3"), ("objective.drs", "mc"),
    ("objective.cfg_placement", "both"), ("objective.distar_c", 0.0), ("objective.beta", 0.0),
    ("objective.snis_m", 1), ("objective.snis_var_max", -1.0), ("objective.snis_variance", "global"),
    ("objective.hybrid_snr", 0.0), ("objective.drp_k", 0), ("objective.snis_mm", 4),
    ("model.attention", "flash"), ("model.remat", "some"), ("reward.name", "pickscore"),
    ("align.k_ta", 0), ("mesh.rules", "tp"), ("model.label_t", 1000), ("model.dtype", "float16"),
    ("mesh.shape", (3, 1, 1)), ("mesh.shape", (-1, -1, 1)), ("align.batch", 7),
    ("align.gen_optimizer.mu_dtype", "float16"), ("model.vae_dtype", "fp32"),
])
def test_t2i_field_is_named(field, value):
  from configs.sdxl import get_config
  from didr_jax.pipelines.validate import validate
  cfg = get_config("tiny")
  validate(cfg)
  _set(cfg, field, value)
  _expect_one_line(validate, cfg, field)


@pytest.mark.parametrize("field, value", [
    ("model.lora.rank", -1), ("model.lora.alpha", 0.0), ("model.lora.targets", ("to_q", "attn9.nowhere")),
    ("model.lora.targets", ("norm1",)), ("model.lora.targets", ()), ("model.lora.networks", ("vae",)),
    ("model.lora.networks", ()),
])
@pytest.mark.parametrize("backbone", ["sdxl", "pixart", "zimage"])
def test_t2i_lora_field_is_named(backbone, field, value):
  """A LoRA setting is checked against the generator network's linear layers before anything is
  built (convolutions take no adapters)."""
  import importlib
  from didr_jax.pipelines.validate import validate
  cfg = importlib.import_module(f"configs.{backbone}").get_config("tiny")
  _set(cfg, "model.lora.rank", 4)
  validate(cfg)
  _set(cfg, field, value)
  _expect_one_line(validate, cfg, field)


def test_t2i_distar_takes_plain_weighting():
  """DI* weights its terms by its own w(t) = s^2/a; the KL methods' dmd2 normaliser is refused,
  not ignored."""
  from configs.sdxl import get_config
  from didr_jax.pipelines.validate import validate
  cfg = get_config("tiny")
  _set(cfg, "method", "distar")
  with pytest.raises(ConfigError, match=r"^config\.objective\.weighting: 'dmd2' .*weighting='plain'"):
    validate(cfg)
  _set(cfg, "objective.weighting", "plain")
  validate(cfg)


def test_t2i_real_run_reward_name_is_checked_before_paths():
  from configs.sdxl import get_config
  from didr_jax.pipelines.validate import validate
  cfg = get_config()
  _set(cfg, "reward.name", "pick_score")
  _expect_one_line(validate, cfg, "reward.name")


@pytest.mark.parametrize("field, value", [
    ("methods", ("didr_mc",)), ("toy.reward", "relu"), ("objective.weighting", "dmd3"),
    ("objective.snis_variance", "global"), ("objective.distar_c", -1.0), ("objective.snis_m", 1),
    ("objective.drp_k", 0), ("toy.beta", 0.0), ("mesh.rules", "tp"), ("eval.bias_t_range", (0.5, 0.2)),
    ("generator.kind", "flow"), ("train.parallel_methods", 0),
])
def test_toy_field_is_named(field, value):
  from configs.toy import get_config
  from didr_jax.toy.validate import validate
  cfg = get_config()
  validate(cfg)
  _set(cfg, field, value)
  _expect_one_line(validate, cfg, field)


def test_toy_monotone_generator_needs_1d():
  from configs.toy import get_config
  from didr_jax.toy.validate import validate
  cfg = get_config()
  cfg.generator.kind = "monotone"
  validate(cfg)
  cfg.toy.means = ((-2.0, 0.0), (2.0, 0.0))
  _expect_one_line(validate, cfg, "generator.kind")


def test_t2i_dit_tiny_prompt_longer_than_its_towers_read():
  from configs.zimage import get_config
  from didr_jax.pipelines.validate import validate
  cfg = get_config("tiny")
  validate(cfg)
  _set(cfg, "tiny.prompts", ("a cat", " ".join(["word"] * 16)))
  with pytest.raises(ConfigError, match=r"^config\.tiny\.prompts: prompt 1 .* has 17 tokens; the "
                                        r"qwen3 tokenizer keeps 16 "):
    validate(cfg)
