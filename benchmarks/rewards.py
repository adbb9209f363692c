"""Reward forward and forward+backward (d reward / d pixels) time per image: ours (jitted JAX)
against the PyTorch reference (eager, same weights and inputs) on the same CPU, in one run.

    PYTHONPATH=. python benchmarks/rewards.py [--batch 4] [--width 256] [--layers 4] [--reps 5]

Small CLIP-shaped config (not the real ViT-L/H sizes: this is a relative, same-machine comparison).
The PyTorch side is the differentiable tensor pipeline of tests/reward_torch.py (torch bicubic
antialiased resize, crop or pad, normalise) followed by transformers' CLIPModel or open_clip's CLIP.
Needs the test dependencies (torch, transformers, open_clip_torch).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--image", type=int, default=112, help="tower input size (224 for real towers)")
  ap.add_argument("--patch", type=int, default=14)
  ap.add_argument("--input", type=int, default=160, help="generated image size fed to the reward")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--force", action="store_true", help="print the ratios on a busy machine too")
  ap.add_argument("--threads", type=int, default=1,
                  help="CPU threads for both frameworks (1: a like-for-like single-core comparison)")
  return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads == 1:  # must precede the first jax import
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()

from tests import clip_torch_env  # noqa: E402,F401  (torchvision workaround; before transformers)
from tests import reward_imagereward as ri  # noqa: E402
from tests import reward_torch as rt  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import LoadRecord  # noqa: E402
from didr_jax import rewards  # noqa: E402
from didr_jax.text import write_clip_tokenizer_files  # noqa: E402
from didr_jax.weights.safetensors_io import write_safetensors  # noqa: E402

PROMPT = "an astronaut riding a horse on the moon, highly detailed"


def build(root, width, layers, image, patch):
  """HF CLIPModel (gelu and quick_gelu), open_clip CLIP, aesthetic head, tokenizer folder."""
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
  from safetensors.torch import save_file
  from transformers import CLIPConfig, CLIPModel
  heads = width // 64
  models = {}
  for act in ("gelu", "quick_gelu"):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, hidden_act=act, eos_token_id=49407),
        vision_config=dict(image_size=image, patch_size=patch, hidden_size=width,
                           intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, hidden_act=act), projection_dim=width)
    models[act] = CLIPModel(cfg).eval()
    models[act].save_pretrained(os.path.join(root, act))
  torch.manual_seed(0)
  oc_cfg = dict(embed_dim=width, vision_cfg=dict(layers=layers, width=width, head_width=64,
                                                  patch_size=patch, image_size=image),
                text_cfg=dict(context_length=77, vocab_size=49408, width=width, heads=heads,
                              layers=layers))
  oc = CLIP(embed_dim=width, vision_cfg=CLIPVisionCfg(**oc_cfg["vision_cfg"]),
            text_cfg=CLIPTextCfg(**oc_cfg["text_cfg"])).eval()
  save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, os.path.join(root, "hps.safetensors"))
  head = rt.aesthetic_mlp(width)
  write_safetensors(os.path.join(root, "head.safetensors"),
                    {k: v.detach().numpy() for k, v in head.state_dict().items()})
  gz = os.path.join(os.path.dirname(clip_torch_env.open_clip().__file__), "bpe_simple_vocab_16e6.txt.gz")
  tok = write_clip_tokenizer_files(gz, os.path.join(root, "tok"))
  return models, oc, oc_cfg, head, tok


def imagereward_torch(model, images, ids, grad):
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(grad)
  with torch.set_grad_enabled(grad):
    scores = model.score(x, ids)
  if grad:
    scores.sum().backward()
  return scores.detach().numpy(), None


def timeit(fn, reps):
  fn()  # warm-up (compiles ours)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)  # the machine is shared: the minimum is the least-disturbed run


def main(args):
  record = LoadRecord(args.force)
  torch.set_num_threads(args.threads)
  root = tempfile.mkdtemp(prefix="reward_bench_")
  models, oc, oc_cfg, head, tok = build(root, args.width, args.layers, args.image, args.patch)
  cases = {  # name: (loader kwargs, torch model, hf naming, score kind, mode)
      "aesthetic": (dict(path=os.path.join(root, "head.safetensors"), clip=os.path.join(root, "quick_gelu")),
                    models["quick_gelu"], True, "aesthetic", "crop"),
      "pickscore": (dict(path=os.path.join(root, "gelu"), tokenizer=tok), models["gelu"], True, "logit", "crop"),
      "hpsv2": (dict(path=os.path.join(root, "hps.safetensors"), tokenizer=tok, config=oc_cfg), oc, False,
                "cosine", "pad"),
      "clipscore": (dict(path=os.path.join(root, "quick_gelu"), tokenizer=tok), models["quick_gelu"], True,
                    "clipscore", "crop"),
  }
  vit = dict(image_size=args.image, patch_size=args.patch, width=args.width, layers=args.layers,
             heads=args.width // 64, mlp_dim=4 * args.width)
  bert = {**ri.BERT, "hidden_size": args.width, "num_hidden_layers": args.layers,
          "num_attention_heads": args.width // 64, "intermediate_size": 4 * args.width}
  ir_model = ri.build(os.path.join(root, "imagereward"), vit=vit, bert=bert)
  cases["imagereward"] = (dict(path=os.path.join(root, "imagereward", "ImageReward.safetensors"),
                               vision=ri.vision_config(vit)), ir_model, None, "imagereward", "crop")
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.input, args.input, 3)).astype(np.float32)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); batch {args.batch}, input {args.input}px -> tower "
        f"{args.image}px/patch {args.patch}, width {args.width}, {args.layers} layers per tower; "
        f"best of {args.reps}, ms per image")
  rows = []
  for name, (kw, model, hf, kind, mode) in cases.items():
    reward = rewards.load(name, **kw)
    ids = None if kind == "aesthetic" else reward.tokenize([PROMPT] * args.batch)
    fwd = jax.jit(reward.apply)
    fb = jax.jit(jax.value_and_grad(lambda p, x, i: reward.apply(p, x, i).sum(), argnums=1))
    ours_f = timeit(lambda: fwd(reward.params, images, ids).block_until_ready(), args.reps)
    ours_fb = timeit(lambda: jax.block_until_ready(fb(reward.params, images, ids)), args.reps)
    if kind == "imagereward":
      run = lambda grad, model=model, ids=ids: imagereward_torch(model, images, ids, grad)
    else:
      run = lambda grad: rt.score_and_grad(kind, model, images, ids, hf=hf, mode=mode, head=head,
                                           size=args.image, grad=grad)
    torch_f = timeit(lambda: run(False), args.reps)
    torch_fb = timeit(lambda: run(True), args.reps)
    err = float(np.abs(np.asarray(fwd(reward.params, images, ids)) - run(False)[0]).max())
    rows.append((name, ours_f, torch_f, ours_fb, torch_fb, err))
  quiet = record.done()
  ratio = lambda torch_s, ours_s: f"{torch_s / ours_s:6.2f}" if quiet else f"{'-':>6}"
  b = args.batch
  print(f"{'reward':<10} {'fwd ours':>9} {'fwd torch':>10} {'ratio':>6} {'f+b ours':>9} {'f+b torch':>10} {'ratio':>6} {'max|ds|':>8}")
  for name, ours_f, torch_f, ours_fb, torch_fb, err in rows:
    print(f"{name:<10} {1e3 * ours_f / b:9.2f} {1e3 * torch_f / b:10.2f} {ratio(torch_f, ours_f)} "
          f"{1e3 * ours_fb / b:9.2f} {1e3 * torch_fb / b:10.2f} {ratio(torch_fb, ours_fb)} {err:8.1e}")
  print("ratio = torch time / ours (> 1: ours faster); max|ds| = largest score difference")


if __name__ == "__main__":
  main(ARGS)
