"""Prompt files (txt / COCO, Parti TSV, JSON, JSONL) and the resumable, sharded prompt sampler."""
import json

import numpy as np
import pytest

from didr_jax.data import FORMATS, PromptDataError, PromptSampler, load_prompts

# The Parti row that a CSV reader mangles: the prompt starts with a double quote.
GIGGLE = '"G I G G L E" painted, in thick "colorful" lettering'


def _write(tmp_path, name, content, mode="w"):
  path = tmp_path / name
  if mode == "wb":
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8", newline="")
  return path


# ---------------------------------------------------------------------------------------------
# load_prompts: formats

def test_txt_coco_like_with_blank_lines_and_crlf(tmp_path):
  path = _write(tmp_path, "captions.txt",
                "A dog on a couch.\n\n  A red bus, parked.  \r\n\t\n\nTwo cats\u2028sleeping.\n\n")
  assert load_prompts(path) == ["A dog on a couch.", "A red bus, parked.",
                                "Two cats\u2028sleeping."]


def test_parti_tsv_quoted_prompt_kept_verbatim(tmp_path):
  path = _write(tmp_path, "parti.tsv",
                "Prompt\tCategory\tChallenge\tNote\n"
                "bond\tAbstract\tBasic\tBiology-inspired, concepts\n"
                f"{GIGGLE}\tIllustrations\tWriting & Symbols\t\n"
                "Dogs playing poker\tAnimals\tImagination\tDescription of \"Dogs Playing Poker\"\n"
                "\n")
  assert load_prompts(path) == ["bond", GIGGLE, "Dogs playing poker"]


def test_tsv_prompt_column_found_by_name(tmp_path):
  path = _write(tmp_path, "p.tsv", "id\tprompt\r\n1\ta cat \r\n2\ta dog\r\n")
  assert load_prompts(path) == ["a cat", "a dog"]
  assert load_prompts(path, field="id") == ["1", "2"]


def test_json_list_of_objects_and_of_strings(tmp_path):
  objs = _write(tmp_path, "bench.json", json.dumps(
      [{"id": "005695-0057", "prompt": " a concept art of a vehicle, cyberpunk "},
       {"id": "x", "prompt": "desolate space, \"epic\""}], indent=4))
  assert load_prompts(objs) == ["a concept art of a vehicle, cyberpunk", "desolate space, \"epic\""]
  strs = _write(tmp_path, "list.json", json.dumps(["one", "", "  two"]))
  assert load_prompts(strs) == ["one", "two"]
  caps = _write(tmp_path, "caps.json", json.dumps([{"caption": "c1"}, {"caption": "c2"}]))
  assert load_prompts(caps, field="caption") == ["c1", "c2"]


def test_jsonl_default_and_custom_field(tmp_path):
  path = _write(tmp_path, "p.jsonl",
                '{"prompt": "a fox", "caption": "x"}\n\n{"prompt": "a \\"wolf\\", howling"}\n')
  assert load_prompts(path) == ["a fox", 'a "wolf", howling']
  caps = _write(tmp_path, "c.jsonl", '{"caption": "c1"}\n"c2"\n')
  assert load_prompts(caps, field="caption") == ["c1", "c2"]


def test_format_sniffed_from_content_and_overridable(tmp_path):
  assert load_prompts(_write(tmp_path, "a.prompts", '{"prompt": "p"}\n')) == ["p"]
  assert load_prompts(_write(tmp_path, "b.prompts", '["p", "q"]')) == ["p", "q"]
  assert load_prompts(_write(tmp_path, "c.prompts", "Prompt\tNote\np\tn\n")) == ["p"]
  assert load_prompts(_write(tmp_path, "d", "p\nq\n")) == ["p", "q"]
  # A .txt holding JSON lines is read as text unless told otherwise.
  path = _write(tmp_path, "e.txt", '{"prompt": "p"}\n')
  assert load_prompts(path) == ['{"prompt": "p"}']
  assert load_prompts(path, format="jsonl") == ["p"]
  assert set(FORMATS) == {"txt", "tsv", "json", "jsonl"}


# ---------------------------------------------------------------------------------------------
# load_prompts: named errors

def _raises(match, path, **kw):
  with pytest.raises(PromptDataError, match=match) as info:
    load_prompts(path, **kw)
  assert str(path) in str(info.value)
  return info.value


def test_errors_missing_empty_and_blank(tmp_path):
  _raises("not found", tmp_path / "nope.txt")
  _raises("not a regular file", tmp_path)
  _raises("empty file", _write(tmp_path, "empty.txt", ""))
  _raises("empty file", _write(tmp_path, "blank.jsonl", "\n \n\t\n"))
  _raises("no prompts", _write(tmp_path, "blank.json", '["", "  "]'))
  _raises("no prompts", _write(tmp_path, "head.tsv", "Prompt\tNote\n\n"))
  assert issubclass(PromptDataError, ValueError)


def test_errors_bad_json_line_and_missing_field(tmp_path):
  _raises(r"line 3: bad JSON", _write(tmp_path, "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": \n'))
  _raises(r"line 2: bad JSON", _write(tmp_path, "bad.json", '[\n  "a",,\n]'))
  _raises(r"line 2: object has no field 'prompt'",
          _write(tmp_path, "f.jsonl", '{"prompt": "a"}\n{"text": "b"}\n'))
  _raises(r"item 1: field 'prompt' is int",
          _write(tmp_path, "f.json", '[{"prompt": "a"}, {"prompt": 3}]'))
  _raises("expected a JSON list", _write(tmp_path, "d.json", '{"prompt": "a"}'))


def test_errors_tsv_without_prompt_column_and_short_row(tmp_path):
  _raises(r"line 1: TSV header has no 'prompt' column",
          _write(tmp_path, "np.tsv", "Text\tCategory\na\tb\n"))
  _raises(r"line 3: 1 tab-separated cells",
          _write(tmp_path, "short.tsv", "Category\tPrompt\nc\tp\nonly\n"))


def test_errors_non_utf8_and_unknown_format(tmp_path):
  _raises(r"line 2: not UTF-8", _write(tmp_path, "latin.txt", "ok\ncaf\xe9\n".encode("latin-1"),
                                       mode="wb"))
  with pytest.raises(PromptDataError, match="format='csv'"):
    load_prompts(_write(tmp_path, "p.txt", "a\n"), format="csv")


# ---------------------------------------------------------------------------------------------
# PromptSampler

PROMPTS = [f"prompt {i}" for i in range(10)]


def _stream(sampler, steps, start=0):
  return [sampler.batch(p) for p in range(start, start + steps)]


def test_sampler_deterministic_and_seed_dependent():
  a = _stream(PromptSampler(PROMPTS, global_batch=4, seed=3, process_index=0, process_count=1), 8)
  b = _stream(PromptSampler(PROMPTS, global_batch=4, seed=3, process_index=0, process_count=1), 8)
  c = _stream(PromptSampler(PROMPTS, global_batch=4, seed=4, process_index=0, process_count=1), 8)
  assert a == b
  assert a != c
  assert PromptSampler(PROMPTS, global_batch=4, seed=3, process_index=0,
                       process_count=1).fingerprint != \
      PromptSampler(PROMPTS, global_batch=4, seed=4, process_index=0, process_count=1).fingerprint


def test_sampler_permutation_contract():
  """Epoch e is numpy's PCG64([seed, e]) permutation: the order is fixed across versions/hosts."""
  s = PromptSampler(PROMPTS, global_batch=5, seed=7, process_index=0, process_count=1)
  for e in range(3):
    want = np.random.Generator(np.random.PCG64([7, e])).permutation(10)
    got = np.concatenate([s.indices(2 * e), s.indices(2 * e + 1)])
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(s.permutation(0), s.permutation(1))
  assert not np.array_equal(s.permutation(0), np.arange(10))
  ordered = PromptSampler(PROMPTS, global_batch=4, seed=7, process_index=0, process_count=1,
                          shuffle=False)
  assert ordered.batch(2) == ["prompt 8", "prompt 9", "prompt 0", "prompt 1"]


def test_sampler_resume_equals_straight_run():
  straight = _stream(PromptSampler(PROMPTS, global_batch=6, seed=1, process_index=1,
                                   process_count=2), 12)
  for p in (0, 1, 5, 7):
    resumed = PromptSampler(PROMPTS, global_batch=6, seed=1, process_index=1, process_count=2)
    assert _stream(resumed, 12 - p, start=p) == straight[p:]


def test_process_slices_concatenate_to_global_batch():
  whole = PromptSampler(PROMPTS, global_batch=12, seed=5, process_index=0, process_count=1)
  parts = [PromptSampler(PROMPTS, global_batch=12, seed=5, process_index=i, process_count=4)
           for i in range(4)]
  for p in range(6):
    assert sum((s.batch(p) for s in parts), []) == whole.batch(p)
    assert all(len(s.batch(p)) == 3 for s in parts)


@pytest.mark.parametrize("global_batch", [3, 4, 10, 25])
def test_every_prompt_once_per_epoch_across_batch_boundaries(global_batch):
  s = PromptSampler(PROMPTS, global_batch=global_batch, seed=11, process_index=0, process_count=1)
  epochs = 5
  flat = np.concatenate([s.indices(p) for p in range(-(-epochs * 10 // global_batch))])
  for e in range(epochs):
    np.testing.assert_array_equal(np.sort(flat[10 * e:10 * (e + 1)]), np.arange(10))
    np.testing.assert_array_equal(flat[10 * e:10 * (e + 1)], s.permutation(e))
  assert s.epoch(3) == pytest.approx(3 * global_batch / 10)


def test_sampler_validation_names_the_field():
  ok = dict(global_batch=4, seed=0, process_index=0, process_count=2)
  cases = [
      ([], ok, "prompts: empty"),
      ("abc", ok, "prompts: expected a sequence"),
      (["a", 3], ok, r"prompts\[1\]"),
      (PROMPTS, {**ok, "global_batch": 0}, "global_batch=0"),
      (PROMPTS, {**ok, "global_batch": 5}, "global_batch=5 is not divisible by process_count=2"),
      (PROMPTS, {**ok, "process_index": 2}, "process_index=2: must be < process_count=2"),
      (PROMPTS, {**ok, "process_count": 0}, "process_count=0"),
      (PROMPTS, {**ok, "seed": -1}, "seed=-1"),
  ]
  for prompts, kw, match in cases:
    with pytest.raises(PromptDataError, match=match):
      PromptSampler(prompts, **kw)
  with pytest.raises(PromptDataError, match="position=-1"):
    PromptSampler(PROMPTS, **ok).batch(-1)


def test_sampler_defaults_to_jax_process():
  s = PromptSampler(PROMPTS, global_batch=4, seed=0)
  assert (s.process_index, s.process_count, s.local_batch) == (0, 1, 4)


def test_sampler_steps_backwards_and_cached_order_is_read_only():
  s = PromptSampler(PROMPTS, global_batch=4, seed=2, process_index=0, process_count=1)
  first = _stream(s, 4)
  assert _stream(s, 4) == first  # steps 3 -> 0 after the cache moved on to later epochs
  with pytest.raises(ValueError):
    s.permutation(0)[0] = 1
