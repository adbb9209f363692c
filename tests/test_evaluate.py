"""``didr_jax.evaluate`` against the reference implementations on tiny random models.

Official preprocessing (uint8 PIL paths) against transformers' CLIPImageProcessor, open_clip's
``resize_mode="longest"`` transform (HPSv2) and torchvision's Resize + CenterCrop (OpenAI CLIP /
BLIP: aesthetic, ImageReward); PickScore and HPSv2.1 scores of a sampled folder against the torch
models fed by those processors; FID against pytorch-fid's network and distance on the same images;
diversity by hand; the HPSv2.1 benchmark aggregation on a hand-computed example; the Pareto
comparison; bad input as one line and exit code 2."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import clip_fixtures as cf  # noqa: I001  (before transformers: torchvision workaround)
import torch

from didr_jax.evaluate import compare, metrics, official, protocols, runner
from didr_jax.errors import ConfigError

pytestmark = pytest.mark.parity
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(40, 56), (56, 40), (33, 33), (32, 32), (21, 47)]
PROMPTS = ["a photo of a red cat", "an astronaut riding a horse", "a bowl of fruit"]


def _uint8(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h, w", SHAPES)
def test_hf_crop_equals_clip_image_processor(h, w):
  """transformers' PIL processor: what PickScore's code ran (transformers 4's default; 5's default
  CLIPImageProcessor resizes uint8 tensors with torchvision, one level off on a few pixels)."""
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  img = _uint8(h, w, h * w)
  proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
  ref = proc(images=[Image.fromarray(img)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(official.preprocess_one(img, 24, "hf_crop"), ref, atol=1e-6)


@pytest.mark.parametrize("h, w", SHAPES)
def test_longest_pad_equals_open_clip_longest_transform(h, w):
  oc = cf.clip_torch_env.open_clip()
  from open_clip.transform import image_transform
  img = _uint8(h, w, h + w)
  tf = image_transform(24, is_train=False, resize_mode="longest", fill_color=0)
  ref = tf(Image.fromarray(img)).numpy().transpose(1, 2, 0)
  assert oc is not None
  np.testing.assert_allclose(official.preprocess_one(img, 24, "longest_pad"), ref, atol=1e-6)


@pytest.mark.parametrize("h, w", SHAPES)
def test_tv_crop_equals_torchvision_clip_transform(h, w):
  from torchvision import transforms as T
  img = _uint8(h, w, 3 * h + w)
  tf = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(24), T.ToTensor(),
                  T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
  ref = tf(Image.fromarray(img)).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(official.preprocess_one(img, 24, "tv_crop"), ref, atol=1e-6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A sampled folder (index.jsonl + PNGs of mixed sizes; 2 seeds per prompt) and tiny models."""
  root = tmp_path_factory.mktemp("evaluate")
  images = root / "images"
  images.mkdir()
  rows, arrays = [], []
  for i, prompt in enumerate(PROMPTS):
    for seed in (0, 1):
      h, w = SHAPES[(2 * i + seed) % len(SHAPES)]
      arr = _uint8(h, w, 10 * i + seed)
      name = f"{i:05d}_{seed}.png"
      Image.fromarray(arr).save(images / name)
      rows.append({"prompt": prompt, "prompt_index": i, "seed": seed, "file": name, "model": "m", "step": 1})
      arrays.append(arr)
  (images / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  tok = cf.tokenizer_folder(str(root / "tok"))
  pick = cf.hf_clip_model(str(root / "pick"), vocab=cf.REAL_VOCAB, eos=cf.REAL_EOS,
                          logit_scale=float(np.log(100.0)))
  hps = cf.open_clip_model(str(root / "hps.safetensors"), vocab=cf.REAL_VOCAB, seed=2)
  specs = [metrics.MetricSpec("pickscore", str(root / "pick"), {"tokenizer": tok}),
           metrics.MetricSpec("hpsv2.1", str(root / "hps.safetensors"),
                              {"tokenizer": tok, "config": cf.openclip_config_dict(vocab=cf.REAL_VOCAB)}),
           metrics.MetricSpec("diversity", str(root / "pick"), {})]
  result = runner.evaluate(str(images), specs, "plain", str(root / "out"), batch=4)
  with open(root / "out" / "scores.csv") as f:
    table = list(csv.DictReader(f))
  return dict(root=root, images=str(images), rows=rows, arrays=arrays, tok=tok, pick=pick, hps=hps,
              result=result, table=table)


def _ids(folder):
  from didr_jax.text import load_clip_tokenizer
  return torch.from_numpy(np.asarray(load_clip_tokenizer(folder["tok"])([r["prompt"] for r in folder["rows"]]),
                                     np.int64))


def test_scores_csv_lists_every_image(folder):
  assert [r["file"] for r in folder["table"]] == [r["file"] for r in folder["rows"]]
  assert list(folder["table"][0]) == ["file", "prompt", "pickscore", "hpsv2.1"]
  assert [r["prompt"] for r in folder["table"]] == [r["prompt"] for r in folder["rows"]]


def test_pickscore_equals_hf_clip_through_its_processor(folder):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": cf.IMAGE}, crop_size={"height": cf.IMAGE, "width": cf.IMAGE})
  px = torch.from_numpy(proc(images=[Image.fromarray(a) for a in folder["arrays"]],
                             return_tensors="np")["pixel_values"])
  model = folder["pick"]
  with torch.no_grad():
    img = model.get_image_features(pixel_values=px).pooler_output
    txt = model.get_text_features(input_ids=_ids(folder)).pooler_output
    ref = (model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)).numpy()
  got = np.asarray([float(r["pickscore"]) for r in folder["table"]])
  assert cf.rel_err(got, ref) <= 1e-4, (got, ref)
  assert folder["result"]["metrics"]["pickscore"]["mean"] == pytest.approx(ref.mean(), rel=1e-4)
  assert folder["result"]["metrics"]["pickscore"]["std"] == pytest.approx(ref.std(), rel=1e-3)


def test_hpsv21_equals_open_clip_through_its_transform(folder):
  cf.clip_torch_env.open_clip()
  from open_clip.transform import image_transform
  tf = image_transform(cf.IMAGE, is_train=False, resize_mode="longest", fill_color=0)
  px = torch.stack([tf(Image.fromarray(a)) for a in folder["arrays"]])
  model = folder["hps"]
  with torch.no_grad():
    ref = 100 * torch.nn.functional.cosine_similarity(model.encode_image(px),
                                                      model.encode_text(_ids(folder))).numpy()
  got = np.asarray([float(r["hpsv2.1"]) for r in folder["table"]])
  assert cf.rel_err(got, ref) <= 1e-4, (got, ref)


def test_diversity_by_hand(folder):
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  proc = CLIPImageProcessorPil(size={"shortest_edge": cf.IMAGE}, crop_size={"height": cf.IMAGE, "width": cf.IMAGE})
  px = torch.from_numpy(proc(images=[Image.fromarray(a) for a in folder["arrays"]],
                             return_tensors="np")["pixel_values"])
  with torch.no_grad():
    e = folder["pick"].get_image_features(pixel_values=px).pooler_output.numpy().astype(np.float64)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  expected = np.mean([np.linalg.norm(e[2 * i] - e[2 * i + 1]) for i in range(len(PROMPTS))])
  assert folder["result"]["metrics"]["diversity"]["value"] == pytest.approx(expected, rel=1e-4)


def test_fid_equals_pytorch_fid_on_the_same_images(folder, tmp_path):
  """Our metric (clean resize, NNX Inception, our distance) vs pytorch-fid's network and distance
  on the clean-resized images, with random Inception weights, against a folder of 'real' images."""
  from tests.test_inception_fid import pf_inception, random_fid_state
  from pytorch_fid.fid_score import calculate_frechet_distance
  from didr_jax.convert import convert_file
  from didr_jax.metrics.fid import clean_resize
  state = random_fid_state(0)
  torch.save(state, tmp_path / "inc.pth")
  convert_file(str(tmp_path / "inc.pth"), str(tmp_path / "inc.safetensors"))
  real = tmp_path / "real"
  real.mkdir()
  real_arrays = [_uint8(48, 48, 100 + k) // 2 + 60 for k in range(3)]
  for k, a in enumerate(real_arrays):
    Image.fromarray(a).save(real / f"{k}.png")
  spec = metrics.MetricSpec("fid", str(tmp_path / "inc.safetensors"), {"ref": str(real)})
  metric = metrics.load(spec)
  got = metric(folder["arrays"], batch=4)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)
    net = pf_inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()

  def stats(arrays):
    x = torch.from_numpy(np.stack([clean_resize(a) / 255.0 for a in arrays]).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
      f = net(x)[0].reshape(len(arrays), -1).numpy().astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)
  ref = calculate_frechet_distance(*stats(folder["arrays"]), *stats(real_arrays))
  assert got == pytest.approx(ref, rel=1e-4)


def test_hpsv21_benchmark_aggregation_by_hand():
  """20 images per style -> 10 chunks of 2. anime 0..19: chunk means 0.5, 2.5, ..., 18.5, mean 9.5,
  std sqrt(33) = 5.7446; concept-art all 3: 3 +- 0; paintings 10 x (1, 5): 3 +- 0; photo
  (0, 0, ..., 0, 40, 40): chunk means nine 0s and 40: 4 +- 12. Average (9.5 + 3 + 3 + 4) / 4 = 4.875."""
  scores = {"anime": np.arange(20.0), "concept-art": np.full(20, 3.0),
            "paintings": np.tile([1.0, 5.0], 10), "photo": np.r_[np.zeros(18), 40.0, 40.0]}
  out = protocols.hps_benchmark(scores)
  assert out["styles"]["anime"]["mean"] == pytest.approx(9.5)
  assert out["styles"]["anime"]["std"] == pytest.approx(5.744562646538029)
  assert out["styles"]["concept-art"] == {"mean": 3.0, "std": 0.0, "chunk_means": [3.0] * 10}
  assert out["styles"]["paintings"]["mean"] == pytest.approx(3.0) and out["styles"]["paintings"]["std"] == 0
  assert out["styles"]["photo"]["mean"] == pytest.approx(4.0) and out["styles"]["photo"]["std"] == pytest.approx(12.0)
  assert out["mean"] == pytest.approx(4.875)
  with pytest.raises(ConfigError, match="'photo' has 19 images"):
    protocols.hps_benchmark({"photo": np.zeros(19)})


def test_compare_marks_the_dominated(tmp_path):
  runs = {"a": {"fid": 20.0, "pickscore": 22.0}, "b": {"fid": 25.0, "pickscore": 21.5},
          "c": {"fid": 18.0, "pickscore": 21.0}}
  for name, m in runs.items():
    (tmp_path / name).mkdir()
    res = {"metrics": {"fid": {"value": m["fid"]}, "pickscore": {"mean": m["pickscore"], "std": 1.0}}}
    (tmp_path / name / "results.json").write_text(json.dumps(res))
  cmp = compare.compare(compare.load_results([str(tmp_path / n) for n in runs]), "fid", "pickscore")
  assert cmp["dominated_by"] == {"a": [], "b": ["a"], "c": []}   # FID: lower is better
  out = subprocess.run([sys.executable, "-m", "didr_jax.evaluate.compare", *[str(tmp_path / n) for n in runs],
                        "--x=fid", "--y=pickscore", f"--out={tmp_path / 'cmp'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| b | 25 | 21.5 | a |" in (tmp_path / "cmp" / "compare.md").read_text()
  assert (tmp_path / "cmp" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_specs_and_protocols_name_the_field(folder, tmp_path):
  cases = [("nope:/x", "--metrics: 'nope' unknown"), ("pickscore", "--metrics: pickscore: expected"),
           ("pickscore:/does/not/exist", "--metrics: pickscore: PATH /does/not/exist not found"),
           (f"hpsv2.1:{folder['root']}/hps.safetensors", "--metrics: hpsv2.1: needs tokenizer="),
           (f"fid:{folder['root']}/pick:bogus=1", "--metrics: fid: option 'bogus=1'")]
  for text, message in cases:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
      metrics.parse_specs(text)
  specs = metrics.parse_specs(f"pickscore:{folder['root']}/pick")
  with pytest.raises(ConfigError, match="--protocol: 'hps' unknown"):
    runner.check_inputs(folder["images"], "hps", specs, None)
  with pytest.raises(ConfigError, match=r"--protocol=coco: needs the metric\(s\) \['fid', 'clipscore'\]"):
    runner.check_inputs(folder["images"], "coco", specs, None)
  broken = tmp_path / "broken"
  broken.mkdir()
  rows = folder["rows"][:2]
  Image.fromarray(folder["arrays"][0]).save(broken / rows[0]["file"])
  (broken / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = subprocess.run([sys.executable, "-m", "didr_jax.evaluate", f"--images={broken}",
                        f"--metrics=pickscore:{folder['root']}/pick", f"--out={tmp_path / 'o'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --images: 1 image(s) listed") and "00000_1.png" in last, last
  assert not (tmp_path / "o").exists()


def test_imagereward_equals_blip_through_its_transform(folder):
  """ImageReward's own transform (torchvision Resize(BICUBIC) + CenterCrop + ToTensor + Normalize
  on a PIL image, its ``_transform``) into the torch towers, against the evaluate metric."""
  from torchvision import transforms as T
  from tests import reward_imagereward as ri
  ref = ri.build(str(folder["root"] / "imagereward"))
  spec = metrics.MetricSpec("imagereward", str(folder["root"] / "imagereward" / "ImageReward.safetensors"),
                            {"vision": ri.vision_config()})
  metric = metrics.load(spec)
  prompts = [r["prompt"] for r in folder["rows"]]
  got = metric(folder["arrays"], prompts, batch=4)
  size = ri.VIT["image_size"]
  tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                  T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
  px = torch.stack([tf(Image.fromarray(a)) for a in folder["arrays"]])
  ids = torch.from_numpy(np.asarray(metric.reward.tokenize(prompts), np.int64))
  with torch.no_grad():
    tokens = ref.visual_encoder.forward_features(px)
    out = ref.text_encoder(input_ids=ids, attention_mask=(ids != 0).long(), encoder_hidden_states=tokens,
                           encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long))
    expected = ((ref.mlp(out.last_hidden_state[:, 0]) - ri.MEAN) / ri.STD)[:, 0].numpy()
  assert cf.rel_err(got, expected) <= 1e-4, (got, expected)


def test_aesthetic_equals_openai_clip_transform_and_head(folder):
  """The LAION predictor's path: OpenAI CLIP's transform (torchvision Resize(BICUBIC) + CenterCrop
  on a PIL image), the image embedding, L2 normalisation, the MLP head; against the metric."""
  from torchvision import transforms as T
  from tests import reward_torch as rt
  from didr_jax.weights.safetensors_io import write_safetensors
  root = folder["root"]
  clip = cf.hf_clip_model(str(root / "openai"), act="quick_gelu", vocab=cf.REAL_VOCAB, eos=cf.REAL_EOS, seed=1)
  torch.manual_seed(3)
  head = rt.aesthetic_mlp(16)
  write_safetensors(str(root / "head.safetensors"), {k: v.detach().numpy() for k, v in head.state_dict().items()})
  metric = metrics.load(metrics.MetricSpec("aesthetic", str(root / "head.safetensors"), {"clip": str(root / "openai")}))
  got = metric(folder["arrays"], [r["prompt"] for r in folder["rows"]], batch=4)
  tf = T.Compose([T.Resize(cf.IMAGE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(cf.IMAGE),
                  T.ToTensor(),
                  T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
  px = torch.stack([tf(Image.fromarray(a)) for a in folder["arrays"]])
  with torch.no_grad():
    e = clip.get_image_features(pixel_values=px).pooler_output
    expected = head(e / e.norm(dim=-1, keepdim=True))[:, 0].numpy()
  assert cf.rel_err(got, expected) <= 1e-4, (got, expected)


def test_parti_groups_by_category_and_challenge(folder, tmp_path):
  """The parti protocol's per-Category and per-Challenge tables equal the per-image scores grouped
  by the TSV's columns; a TSV that is not the sampled one is refused."""
  tsv = tmp_path / "parti.tsv"
  tsv.write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(
      f"{p}\t{c}\t{h}\t\n" for p, c, h in zip(PROMPTS, ["Animals", "People", "Animals"],
                                              ["Simple", "Simple", "Imagination"])))
  specs = [metrics.MetricSpec("pickscore", str(folder["root"] / "pick"), {"tokenizer": folder["tok"]})]
  result = runner.evaluate(folder["images"], specs, "parti", str(tmp_path / "out"), batch=4, prompts_file=str(tsv))
  scores = np.asarray([float(r["pickscore"]) for r in folder["table"]])
  index = np.asarray([r["prompt_index"] for r in folder["rows"]])
  animals = scores[(index == 0) | (index == 2)]
  assert result["per_category"]["Animals"]["pickscore"]["mean"] == pytest.approx(animals.mean(), rel=1e-6)
  assert result["per_category"]["Animals"]["pickscore"]["count"] == 4
  assert result["per_challenge"]["Imagination"]["pickscore"]["mean"] == pytest.approx(scores[index == 2].mean(), rel=1e-6)
  assert "| Animals |" in (tmp_path / "out" / "results.md").read_text()
  wrong = tmp_path / "wrong.tsv"
  wrong.write_text("Prompt\tCategory\tChallenge\nsomething else\tA\tB\n" * 1)
  with pytest.raises(ConfigError, match="prompt 0 is not 'a photo of a red cat'"):
    runner.check_inputs(folder["images"], "parti", specs, str(wrong))
