"""Prompt files and a deterministic, resumable, per-process-sharded prompt sampler.

Formats (``load_prompts``):

* ``txt``: one prompt per line (plain lists, the COCO-2014 30k caption file);
* ``tsv``: a header row naming the columns, one prompt per row in the column named ``field``
  (case-insensitive; PartiPrompts: ``Prompt	Category	Challenge	Note``). Rows are split on tabs
  only: Parti prompts may begin with a double quote (``"G I G G L E" painted ...``), which a CSV
  reader would take for a quoted field and mangle;
* ``json``: a list of strings or of objects holding ``field`` (ImageReward's benchmark prompts);
* ``jsonl``: one JSON object holding ``field`` (or one JSON string) per line.

The sampler has no state besides its constructor arguments: the batch at global step ``position``
is a pure function of ``(prompts, seed, global_batch, position)``, so the data position the
trainer stores in its checkpoint is that one integer, and a resumed run continues exactly where an
uninterrupted one would be.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np

FORMATS = ("txt", "tsv", "json", "jsonl")
_SUFFIXES = {".txt": "txt", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class PromptDataError(ValueError):
  """A prompt file is missing, empty or unreadable, or the sampler got invalid arguments."""


def _read_text(path: str) -> str:
  """The file as text (UTF-8, BOM dropped); a decoding error names the line it happened on."""
  if not os.path.exists(path):
    raise PromptDataError(f"{path}: prompt file not found")
  if not os.path.isfile(path):
    raise PromptDataError(f"{path}: not a regular file")
  with open(path, "rb") as f:
    data = f.read()
  if not data.strip():
    raise PromptDataError(f"{path}: empty file (no prompts)")
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise PromptDataError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") \
        from e


def _detect_format(path: str, text: str) -> str:
  """From the suffix; for other suffixes from the content (JSON list, JSON lines, TSV, text)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in _SUFFIXES:
    return _SUFFIXES[suffix]
  head = text.lstrip()
  if head.startswith("["):
    return "json"
  if head.startswith("{"):
    return "jsonl"
  if "\t" in head.split("\n", 1)[0]:
    return "tsv"
  return "txt"


def _prompt_from(item, field: str, where: str) -> str:
  """A prompt from one JSON item: a string, or an object holding a string under ``field``."""
  if isinstance(item, str):
    return item
  if isinstance(item, dict):
    if field not in item:
      raise PromptDataError(f"{where}: object has no field {field!r} (fields: {sorted(item)})")
    value = item[field]
    if not isinstance(value, str):
      raise PromptDataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value
  raise PromptDataError(f"{where}: expected a string or an object, got {type(item).__name__}")


def _parse_txt(path: str, text: str, field: str) -> list[str]:
  # split("\n") rather than splitlines(): the latter also breaks at \x0b, \x1c, \u2028, ...
  return text.split("\n")


def _parse_tsv(path: str, text: str, field: str) -> list[str]:
  lines = text.split("\n")
  header = [h.strip() for h in lines[0].split("\t")]
  names = [h.lower() for h in header]
  if field.lower() not in names:
    raise PromptDataError(f"{path}, line 1: TSV header has no {field!r} column (columns: {header})")
  col = names.index(field.lower())
  prompts = []
  for n, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    cells = line.split("\t")
    if col >= len(cells):
      raise PromptDataError(
          f"{path}, line {n}: {len(cells)} tab-separated cells, the {header[col]!r} column is "
          f"number {col + 1}")
    prompts.append(cells[col])
  return prompts


def _parse_json(path: str, text: str, field: str) -> list[str]:
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    raise PromptDataError(f"{path}, line {e.lineno}: bad JSON ({e.msg})") from e
  if not isinstance(items, list):
    raise PromptDataError(f"{path}: expected a JSON list of prompts, got {type(items).__name__}")
  return [_prompt_from(item, field, f"{path}, item {i}") for i, item in enumerate(items)]


def _parse_jsonl(path: str, text: str, field: str) -> list[str]:
  prompts = []
  for n, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptDataError(f"{path}, line {n}: bad JSON ({e.msg})") from e
    prompts.append(_prompt_from(item, field, f"{path}, line {n}"))
  return prompts


_PARSERS = {"txt": _parse_txt, "tsv": _parse_tsv, "json": _parse_json, "jsonl": _parse_jsonl}


def load_prompts(path: str | os.PathLike, format: str = "auto", field: str = "prompt") -> list[str]:
  """Prompts of a file, whitespace-stripped, empty ones dropped, in file order.

  ``format``: ``"auto"`` (by suffix ``.txt``/``.tsv``/``.json``/``.jsonl``, else by content) or
  one of :data:`FORMATS`. ``field``: the JSON key or TSV column (case-insensitive) holding the
  prompt. Raises :class:`PromptDataError` naming the file (and line) and the reason.
  """
  path = os.fspath(path)
  if format != "auto" and format not in FORMATS:
    raise PromptDataError(f"format={format!r}: expected 'auto' or one of {FORMATS}")
  text = _read_text(path)
  fmt = _detect_format(path, text) if format == "auto" else format
  prompts = [p.strip() for p in _PARSERS[fmt](path, text, field)]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise PromptDataError(f"{path}: no prompts (read as {fmt})")
  return prompts


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise PromptDataError(f"{name}={value!r}: expected an integer >= {minimum}")
  return int(value)


class PromptSampler:
  """This process's rows of the global prompt batch at each global step.

  The prompts form an endless stream, epoch after epoch, each epoch a permutation drawn from
  ``numpy.random.Generator(PCG64([seed, epoch]))`` (identity order with ``shuffle=False``). Global
  step ``position`` takes stream items ``[position * global_batch, (position + 1) * global_batch)``,
  crossing epoch boundaries seamlessly, and this process gets the contiguous slice
  ``[process_index * local_batch, (process_index + 1) * local_batch)`` of them, the layout
  ``jax.make_array_from_process_local_data`` expects for a batch sharded over the data axes.
  ``process_index``/``process_count`` default to JAX's.
  """

  def __init__(self, prompts: Sequence[str], *, global_batch: int, seed: int,
               process_index: int | None = None, process_count: int | None = None,
               shuffle: bool = True):
    if isinstance(prompts, str):
      raise PromptDataError("prompts: expected a sequence of strings, got one string")
    self.prompts = tuple(prompts)
    if not self.prompts:
      raise PromptDataError("prompts: empty, nothing to sample")
    for i, p in enumerate(self.prompts):
      if not isinstance(p, str):
        raise PromptDataError(f"prompts[{i}]: expected a string, got {type(p).__name__}")
    if process_index is None or process_count is None:
      import jax
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.global_batch = _check_int("global_batch", global_batch, 1)
    self.seed = _check_int("seed", seed, 0)
    self.process_count = _check_int("process_count", process_count, 1)
    self.process_index = _check_int("process_index", process_index, 0)
    if self.process_index >= self.process_count:
      raise PromptDataError(
          f"process_index={self.process_index}: must be < process_count={self.process_count}")
    if self.global_batch % self.process_count:
      raise PromptDataError(
          f"global_batch={self.global_batch} is not divisible by "
          f"process_count={self.process_count}")
    self.local_batch = self.global_batch // self.process_count
    self.shuffle = bool(shuffle)
    # Stored next to the data position in a checkpoint, it catches a resume with other prompts
    # or another seed, which would silently change the stream.
    self.fingerprint = hashlib.sha256(
        json.dumps([self.seed, self.shuffle, self.prompts]).encode("utf-8")).hexdigest()[:16]
    self._perms: dict[int, np.ndarray] = {}

  def epoch(self, position: int) -> float:
    """Epochs completed at the start of global step ``position`` (for logging)."""
    return _check_int("position", position, 0) * self.global_batch / len(self.prompts)

  def permutation(self, epoch: int) -> np.ndarray:
    """Prompt indices of ``epoch`` in stream order."""
    epoch = _check_int("epoch", epoch, 0)
    if epoch not in self._perms:
      n = len(self.prompts)
      if self.shuffle:
        perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)
      else:
        perm = np.arange(n)
      perm.flags.writeable = False  # shared by every later call: a caller's edit would leak
      if len(self._perms) >= 2:  # steps move forward: the two latest epochs are all we reuse
        self._perms.pop(min(self._perms))
      self._perms[epoch] = perm
    return self._perms[epoch]

  def indices(self, position: int) -> np.ndarray:
    """Prompt indices of this process's rows at global step ``position``, int64 [local_batch]."""
    position = _check_int("position", position, 0)
    n = len(self.prompts)
    start = position * self.global_batch + self.process_index * self.local_batch
    out = np.empty(self.local_batch, np.int64)
    filled = 0
    while filled < self.local_batch:
      epoch, offset = divmod(start + filled, n)
      take = min(self.local_batch - filled, n - offset)
      out[filled:filled + take] = self.permutation(epoch)[offset:offset + take]
      filled += take
    return out

  def batch(self, position: int) -> list[str]:
    """This process's prompts at global step ``position``."""
    return [self.prompts[i] for i in self.indices(position)]
