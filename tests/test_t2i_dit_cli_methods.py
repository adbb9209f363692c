"""Every method and DRS estimator through ``python -m didr_jax.main`` on the ``:tiny`` PixArt and
Z-Image configs (1 CPU device; DIDR with the default snis estimator, resume and export:
tests/test_t2i_dit_cli.py). Each run must log finite losses for its 3 steps, evaluate, checkpoint
and export ``transformer`` + ``transformer_ema`` (LoRA: also the adapters and the tiny base; their
numerics: tests/test_lora_dit.py and, for the UNet, tests/test_t2i_lora_cli.py)."""
import os

import numpy as np
import pytest

from tests import t2i_cli

pytestmark = [pytest.mark.slow, pytest.mark.long]

CONFIGS = {"pixart": "configs/pixart.py:tiny", "zimage": "configs/zimage.py:tiny"}
RUNS = {"di": (), "dipp": (), "distar": ("--config.objective.weighting=plain",),
        "didr-hybrid": ("--config.objective.drs=hybrid",), "didr-drp": ("--config.objective.drs=drp",),
        "didr-lora": ("--config.model.lora.rank=4",)}
KEYS = {"dipp": ("dipp/reward", "dipp/kl_grad_norm"), "distar": ("distar/reward", "distar/pseudo_huber"),
        "didr-hybrid": ("didr/kl_grad_norm",), "didr-drp": ("didr/kl_grad_norm", "didr/drp_reward")}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_method_runs_three_steps_and_exports(backbone, run, tmp_path):
  method = run.split("-")[0]
  workdir = str(tmp_path / "run")
  cmd = t2i_cli.command(workdir, method, *RUNS[run], config=CONFIGS[backbone])
  t2i_cli.run(cmd, t2i_cli.env(str(tmp_path / "jax_cache"), devices=1))
  t2i_cli.assert_complete_run(workdir, method, keys=KEYS.get(run, ()),
                              names=("transformer", "transformer_ema"))
  final = t2i_cli.exported(workdir, "transformer")
  assert all(np.all(np.isfinite(v)) for v in final.values())
  if run == "didr-lora":
    from didr_jax.weights import read_safetensors
    base = t2i_cli.exported(workdir, "transformer_base")
    assert any(not np.array_equal(final[k], base[k]) for k in final), "the adapters must move it"
    for name in ("transformer_lora", "transformer_ema_lora"):
      peft = read_safetensors(os.path.join(workdir, "export", name, "pytorch_lora_weights.safetensors"))
      assert peft and all(k.startswith("transformer.") for k in peft), name
