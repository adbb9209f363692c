"""Digits alignment on the real (tiny) UNet: a run checkpointed at step 2 and restored from disk
by a new Checkpointer continues to step 4 bit for bit like the uninterrupted run (66 s: long tier)."""
import jax
import numpy as np
import pytest

from tests.toy_tiny import dump_state


@pytest.mark.long
def test_alignment_resume_equals_uninterrupted(tmp_path):
  from configs.digits import get_config
  from didr_jax.digits.phases import Aligner
  from didr_jax.digits.problem import Digits
  from didr_jax.training.checkpoint import Checkpointer
  cfg = get_config("fast")
  with cfg.unlocked():
    cfg.unet.width = 8
    cfg.align.batch = 8
  dg = Digits(cfg, devices=jax.devices()[:1])
  aligner = Aligner(dg, {"ref": dg.unet_init, "clf": dg.clf_init["reward"]})
  warm = aligner.init_state(dg.unet_init, dg.unet_init)
  run = lambda ckpt, n: aligner.align("di", "di", None, None, warm, ckpt, None, None, num_steps=n)
  straight = dump_state(run(None, 4))
  ckpt = lambda: Checkpointer(str(tmp_path / "ckpt"), identity={"run": "di"}, max_to_keep=2,
                              save_every=2, async_save=False)
  first = ckpt()
  half = dump_state(run(first, 2))
  first.close()
  second = ckpt()
  assert second.latest_step() == 2
  resumed = dump_state(run(second, 4))
  second.close()
  assert int(half[".step"]) == 2 and int(resumed[".step"]) == 4
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
  k = next(k for k in straight if "gen_params" in k and "kernel" in k)
  assert not np.array_equal(half[k], straight[k]), "the generator must move between steps 2 and 4"
