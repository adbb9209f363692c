"""README.md, docs/*.md and launch/README.md against the repository: every file path, module,
config field and link they name exists; every shell command they show is either run by a named test
(on its tiny or fast variant) or labelled as needing real weights or an accelerator; and nothing
points outside the repository. Static checks only: no subprocess, no JAX."""
import ast
import functools
import glob
import importlib.util
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "launch/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Named in the docs before they exist; each entry is tolerated only while it is missing.
PENDING_PATHS = set()
PENDING_FIELDS = set()

# Every config file in configs/ is loaded with its default and these variants; a field named in
# the docs must exist in at least one of them.
VARIANTS = {"toy": ("fast",), "sdxl": ("tiny",), "sd15": ("tiny",), "pixart": ("tiny",),
            "zimage": ("tiny",), "digits": ("fast",)}
CONFIGS = tuple((f"configs/{name}", ("",) + VARIANTS.get(name[:-3], ()))
                for name in sorted(os.listdir(os.path.join(ROOT, "configs"))) if name.endswith(".py"))

# Shell commands shown in the docs without a label, and the test that runs each one (or its
# tiny / fast variant). Keys are the command as shown, continuation lines joined.
COMMANDS = {
    "pip install -r requirements.txt && python -m didr_jax.main --config=configs/toy.py":
        "tests/test_toy_convergence.py::test_didr_reaches_p_star",          # :fast variant
    "pip install -r requirements-test.txt && python -m pytest -q": ".ci/run",
    "python -m didr_jax.main --config=configs/sdxl.py:tiny --workdir=runs/tiny --config.method=didr":
        "tests/test_t2i_cli.py::test_sigterm_saves_and_exits_zero_then_reruns_resume",
    "python -m didr_jax.main --config=configs/sd15.py:tiny --workdir=runs/tiny15":
        "tests/test_t2i_pipeline.py::test_sd15_tiny_generator_reward_and_uncond",  # in-process
    "python -m didr_jax.main --config=configs/pixart.py:tiny --workdir=runs/tiny-pixart":
        "tests/test_t2i_dit_cli.py::test_resume_after_sigterm_equals_uninterrupted_run",
    "python -m didr_jax.main --config=configs/zimage.py:tiny --workdir=runs/tiny-zimage":
        "tests/test_t2i_dit_cli.py::test_resume_after_sigterm_equals_uninterrupted_run",
    "python -m didr_jax.main --config=configs/digits.py:fast":
        "tests/test_digits_cli.py::test_rerun_resumes_the_interrupted_runs",
    "python -m didr_jax.sample --workdir=runs/tiny --prompts=prompts.txt --images_per_prompt=2 "
    "--out=runs/tiny-samples": "tests/test_sample_cli.py::test_same_files_on_one_and_eight_devices",
    "python -m didr_jax.plan --config=configs/sdxl.py:tiny --topology=v5e:2x2 --out=runs/plan-tiny":
        "tests/test_plan.py::test_plan_json_has_every_field",
}
# A shell block whose neighbouring paragraph carries one of these labels may show any command.
LABELS = ("(needs real weights)", "(needs an accelerator)", "(needs real weights and an accelerator)",
          "(benchmark: not run by the test suite)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FILE_SUFFIXES = {"py", "md", "json", "txt", "sh", "png", "safetensors", "bin", "pt", "pth", "npz"}
FORBIDDEN = ("../shared", "METHOD.md", "MODELS.md", "JAX.md", "/work/")

PATH_RE = re.compile(r"(?<![\w./<-])((?:didr_jax|configs|launch|benchmarks|tests|docs|\.ci)/[\w./*-]*"
                     r"|README\.md|requirements(?:-test)?\.txt|pyproject\.toml)")
MODULE_RE = re.compile(r"(?<![\w./-])(didr_jax(?:\.[A-Za-z_]\w*)*)(?![\w-])")
RUN_MODULE_RE = re.compile(r"\bpython3? -m ([A-Za-z_][\w.]*)")
FROM_IMPORT_RE = re.compile(r"^\s*from (didr_jax[\w.]*) import ([\w, ]+)$", re.M)
FLAG_RE = re.compile(r"--config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
CONFIG_RE = re.compile(r"(?<![\w.-])config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
BACKTICK_RE = re.compile(r"`([^`\n]+)`")
DOTTED_RE = re.compile(r"^(?:--config\.|config\.)?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```(\w*)\s*$")
TEST_ID_RE = re.compile(r"((?:tests|benchmarks)/\w+\.py)::(\w+)")
NAME_IN_FILE_RE = re.compile(r"`([A-Za-z_]\w*)(?:\.\w+)*`(?:\s+\([^)]*\))?\s+in\s+"
                             r"`((?:didr_jax|tests|benchmarks|configs)/[\w/]+\.py)`")


def _read(rel):
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


def _prose(text):
  """The text without fenced blocks (field and link checks read prose and tables only)."""
  return re.sub(r"^```.*?^```\s*$", "", text, flags=re.M | re.S)


# ---------------------------------------------------------------- config fields


def _load_config(path, variant):
  spec = importlib.util.spec_from_file_location(f"_docs_cfg_{os.path.basename(path)[:-3]}",
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant).to_dict()


def _paths(d, prefix=""):
  for k, v in d.items():
    yield prefix + k
    if isinstance(v, dict):
      yield from _paths(v, prefix + k + ".")


@functools.lru_cache(maxsize=None)
def config_fields():
  """(every field and group path of every config variant, the top-level group names)."""
  fields, groups = set(), set()
  for path, variants in CONFIGS:
    for variant in variants:
      d = _load_config(path, variant)
      fields.update(_paths(d))
      groups.update(k for k, v in d.items() if isinstance(v, dict))
  return frozenset(fields), frozenset(groups)


def named_fields(text):
  """Config fields named in the docs: every --config.x (commands included); in prose and tables,
  config.x, backticked dotted names that start with a config group, and the backticked names in the
  first cell of "| field | default ..." tables."""
  _, groups = config_fields()
  prose = _prose(text)
  out = set(FLAG_RE.findall(text))
  out.update(f for f in CONFIG_RE.findall(prose) if f.split(".")[0] not in FILE_SUFFIXES)
  for content in BACKTICK_RE.findall(prose):
    m = DOTTED_RE.match(content.strip())
    if m and m.group(1).split(".")[0] in groups and m.group(1).split(".")[-1] not in FILE_SUFFIXES:
      out.add(m.group(1))
  in_table = False
  for line in prose.splitlines():
    if line.startswith("| field | default"):
      in_table = True
      continue
    if not line.startswith("|"):
      in_table = False
    elif in_table and not line.startswith("|---"):
      first = line.split("|")[1]
      out.update(c for c in BACKTICK_RE.findall(first) if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", c))
  return out


# ---------------------------------------------------------------- modules


def _module_file(parts):
  base = os.path.join(ROOT, *parts)
  for cand in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(cand):
      return cand
  return None


@functools.lru_cache(maxsize=None)
def _top_level(path):
  """Names a module defines or imports at top level, and the attribute names of its classes."""
  tree = ast.parse(_read(os.path.relpath(path, ROOT)))
  names, members = set(), {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
      if isinstance(node, ast.ClassDef):
        body = node.body
        members[node.name] = (
            {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            | {n.target.id for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            | {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)})
    elif isinstance(node, ast.Assign):
      names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names.add(node.target.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
  return names, members


def resolve(dotted):
  """None if ``didr_jax.a.b[.Attr[.member]]`` exists in the source tree, else the reason."""
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    path = _module_file(parts[:i])
    if path is None:
      continue
    rest = parts[i:]
    if not rest:
      return None
    names, members = _top_level(path)
    if rest[0] not in names:
      return f"{dotted}: {os.path.relpath(path, ROOT)} defines no {rest[0]!r}"
    if len(rest) > 1 and rest[0] in members and rest[1] not in members[rest[0]]:
      return f"{dotted}: class {rest[0]} has no {rest[1]!r}"
    return None
  return f"{dotted}: no such module"


def named_modules(text):
  mods = set(MODULE_RE.findall(text))
  for module, names in FROM_IMPORT_RE.findall(text):
    mods.update(f"{module}.{n.strip()}" for n in names.split(",") if n.strip())
  return mods


@functools.lru_cache(maxsize=None)
def defined_anywhere(rel):
  """Every function and class name defined in a file, nested ones included."""
  return {n.name for n in ast.walk(ast.parse(_read(rel)))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def named_definitions(text):
  """(file, name) pairs the docs name: ``tests/x.py::test_y`` and "`name` in `path.py`"."""
  return set(TEST_ID_RE.findall(text)) | {(path, name) for name, path in NAME_IN_FILE_RE.findall(text)}


# ---------------------------------------------------------------- commands


def shell_blocks(text):
  """(commands, paragraph before, paragraph after) of every fenced shell block."""
  lines = text.splitlines()
  i, out = 0, []
  while i < len(lines):
    m = FENCE_RE.match(lines[i])
    if not m:
      i += 1
      continue
    start = i
    i += 1
    body = []
    while i < len(lines) and not lines[i].startswith("```"):
      body.append(lines[i])
      i += 1
    end, i = i, i + 1
    if m.group(1) not in SHELL_LANGS:
      continue
    before = []
    j = start - 1
    while j >= 0 and not lines[j].strip():
      j -= 1
    while j >= 0 and lines[j].strip() and not lines[j].startswith("```"):
      before.insert(0, lines[j].strip())
      j -= 1
    after = []
    j = end + 1
    while j < len(lines) and not lines[j].strip():
      j += 1
    while j < len(lines) and lines[j].strip() and not lines[j].startswith("```"):
      after.append(lines[j].strip())
      j += 1
    commands, current = [], ""
    for line in body:
      line = re.sub(r"\s+#\s.*$", "", line).rstrip()
      if not line.strip() or line.lstrip().startswith("#"):
        continue
      current += line.strip()
      if current.endswith("\\"):
        current = current[:-1].rstrip() + " "
        continue
      commands.append(current)
      current = ""
    out.append((commands, " ".join(before), " ".join(after)))
  return out


# ---------------------------------------------------------------- anchors


def _slug(heading):
  s = unicodedata.normalize("NFKC", heading.strip().lower())
  s = re.sub(r"[^\w\- ]", "", s)
  return s.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(rel):
  seen, out = {}, set()
  for line in _prose(_read(rel)).splitlines():
    m = re.match(r"^#{1,6}\s+(.*)$", line)
    if m:
      base = _slug(re.sub(r"[`*]", "", m.group(1)))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f"{base}-{n}")
  return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
  text = _read(doc)
  missing = []
  for raw in set(PATH_RE.findall(text)):
    path = raw.rstrip(".,:;")
    found = glob.glob(os.path.join(ROOT, path)) if "*" in path else os.path.exists(os.path.join(ROOT, path))
    if not found and path not in PENDING_PATHS:
      missing.append(path)
  assert not missing, f"{doc} names paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_anchors_resolve(doc):
  bad = []
  for target in LINK_RE.findall(_prose(_read(doc))):
    if re.match(r"^[a-z]+:", target):
      continue                                     # external URL
    path, _, anchor = target.partition("#")
    rel = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if rel.startswith(".."):
      bad.append(f"{target} (outside the repository)")
    elif not os.path.exists(os.path.join(ROOT, rel)):
      if rel not in PENDING_PATHS:
        bad.append(f"{target} (no file {rel})")
    elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
      bad.append(f"{target} (no heading #{anchor} in {rel})")
  assert not bad, f"{doc}: broken links: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_modules_exist(doc):
  text = _read(doc)
  bad = [reason for reason in map(resolve, sorted(named_modules(text))) if reason]
  for module in set(RUN_MODULE_RE.findall(text)):
    if module.split(".")[0] == "didr_jax":
      if _module_file(module.split(".")) is None:
        bad.append(f"python -m {module}: no module file")
    elif importlib.util.find_spec(module) is None:
      bad.append(f"python -m {module}: not installed")
  assert not bad, f"{doc}: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_functions_and_tests_exist(doc):
  bad = [f"{path}::{name}" for path, name in sorted(named_definitions(_read(doc)))
         if not os.path.isfile(os.path.join(ROOT, path)) or name not in defined_anywhere(path)]
  assert not bad, f"{doc} names definitions that do not exist: {bad}"


@pytest.mark.parametrize("doc", DOCS)
def test_named_config_fields_exist(doc):
  fields, _ = config_fields()
  unknown = sorted(f for f in named_fields(_read(doc)) if f not in fields and f not in PENDING_FIELDS)
  assert not unknown, f"{doc} names config fields that no config in {[c for c, _ in CONFIGS]} has: {unknown}"


@pytest.mark.parametrize("doc", DOCS + ["requirements.txt", "requirements-test.txt", "pyproject.toml"])
def test_nothing_outside_the_repository(doc):
  text = _read(doc)
  hits = [s for s in FORBIDDEN if s in text]
  assert not hits, f"{doc} refers outside the repository: {hits}"


@pytest.mark.parametrize("doc", DOCS)
def test_shell_commands_are_tested_or_labelled(doc):
  bad = []
  for commands, before, after in shell_blocks(_read(doc)):
    if any(label in before or label in after for label in LABELS):
      continue
    bad += [c for c in commands if c not in COMMANDS]
  assert not bad, (f"{doc}: commands neither run by a test (COMMANDS in tests/test_docs.py) nor "
                   f"labelled {LABELS}: {bad}")


def test_command_allow_list_is_shown_and_points_at_real_tests():
  shown = set()
  for doc in DOCS:
    for commands, _, _ in shell_blocks(_read(doc)):
      shown.update(commands)
  assert set(COMMANDS) <= shown, f"allow-listed but shown nowhere: {sorted(set(COMMANDS) - shown)}"
  for command, where in COMMANDS.items():
    path, _, func = where.partition("::")
    assert os.path.isfile(os.path.join(ROOT, path)), (command, where)
    if func:
      assert re.search(rf"^def {func}\(", _read(path), re.M), (command, where)
    else:
      assert command.split("&& ")[-1] in _read(path), (command, where)


def test_pending_entries_are_still_pending():
  """Once a pending path or field exists, it must be taken off the pending lists."""
  fields, _ = config_fields()
  assert not [p for p in PENDING_PATHS if os.path.exists(os.path.join(ROOT, p))], "remove from PENDING_PATHS"
  assert not PENDING_FIELDS & fields, f"remove from PENDING_FIELDS: {sorted(PENDING_FIELDS & fields)}"
