"""Every test that needs PyTorch carries the ``parity`` marker, so ``pytest -m "not parity"`` runs on a
machine without torch.

A test needs PyTorch when it, a fixture it takes, or a function it calls (in tests/, followed
transitively) imports torch / torchvision / diffusers / open_clip / timm, a transformers model
class, a tests/ helper module that does so at import time, or ``didr_jax.convert`` (the one runtime
module that imports torch; ``python -m didr_jax.convert`` counts too). Test modules that need torch
at import time also skip themselves when it is absent, so collecting ``-m "not parity"`` imports
no torch.
"""
import ast
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCH_PACKAGES = {"torch", "torchvision", "diffusers", "open_clip", "timm"}
TORCH_MODULES = {"didr_jax.convert"}   # runtime modules that import torch (inside functions)


def _needs_torch_import(node) -> bool:
  """An import statement that loads PyTorch (transformers: anything but configs and tokenizers)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    if node.module.split(".")[0] == "transformers":
      return ".modeling_" in node.module or any(
          not a.name.endswith(("Config", "Tokenizer", "TokenizerFast")) for a in node.names)
    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  else:
    return False
  return any(n.split(".")[0] in TORCH_PACKAGES or n in TORCH_MODULES for n in names)


def _tests_modules_imported(node) -> dict[str, str]:
  """{bound name: tests module} of an import statement (``from tests import x``, ``import tests.x``,
  ``from tests.x import f`` binds f to ``x:f``)."""
  out = {}
  if isinstance(node, ast.ImportFrom) and node.module == "tests":
    out = {a.asname or a.name: a.name for a in node.names}
  elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
    mod = node.module.split(".", 1)[1]
    out = {a.asname or a.name: f"{mod}:{a.name}" for a in node.names}
  elif isinstance(node, ast.Import):
    out = {a.asname: a.name.split(".", 1)[1] for a in node.names if a.name.startswith("tests.") and a.asname}
  return out


def _is_fixture(fn) -> bool:
  for d in fn.decorator_list:
    target = d.func if isinstance(d, ast.Call) else d
    if isinstance(target, ast.Attribute) and target.attr == "fixture":
      return True
  return False


class Module:
  def __init__(self, name: str, tree: ast.Module):
    self.name, self.tree = name, tree
    self.functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    self.fixtures = {k for k, f in self.functions.items() if _is_fixture(f)}
    top = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
           and not any(n in ast.walk(f) for f in self.functions.values())]
    self.import_time_torch = any(_needs_torch_import(n) for n in top)
    self.bound = {}
    for n in top:
      self.bound.update(_tests_modules_imported(n))
    self.pytestmark = "".join(ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
                              and any(getattr(t, "id", "") == "pytestmark" for t in n.targets))


def load_modules() -> dict[str, Module]:
  out = {}
  for f in sorted(os.listdir(HERE)):
    if f.endswith(".py"):
      with open(os.path.join(HERE, f)) as fh:
        out[f[:-3]] = Module(f[:-3], ast.parse(fh.read(), f))
  return out


class Analysis:
  """Which modules need torch at import, which functions need it when they run."""

  def __init__(self, modules: dict[str, Module]):
    self.modules = modules
    self._import_time = {}
    self._fn = {}

  def import_time(self, name: str) -> bool:
    if name not in self._import_time:
      self._import_time[name] = False   # an import cycle adds nothing the cycle's members lack
      m = self.modules.get(name)
      self._import_time[name] = m is not None and (m.import_time_torch or any(
          self.import_time(t.split(":")[0]) for t in m.bound.values()))
    return self._import_time[name]

  def _refs(self, m: Module, fn) -> tuple[bool, set]:
    """(direct torch use, {(module, function)} it refers to) of one function."""
    bound = dict(m.bound)
    direct = False
    for n in ast.walk(fn):
      if isinstance(n, (ast.Import, ast.ImportFrom)):
        direct |= _needs_torch_import(n)
        new = _tests_modules_imported(n)
        direct |= any(self.import_time(t.split(":")[0]) for t in new.values())
        bound.update(new)
      elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in TORCH_MODULES:
        direct = True                                   # python -m didr_jax.convert
    refs = set()
    for n in ast.walk(fn):
      if isinstance(n, ast.Name) and n.id in m.functions:
        refs.add((m.name, n.id))
      elif isinstance(n, ast.Name) and ":" in bound.get(n.id, ""):
        refs.add(tuple(bound[n.id].split(":")))
      elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound:
        refs.add((bound[n.value.id], n.attr))
    params = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
    conftest = self.modules.get("conftest")
    for p in params:
      if p in m.fixtures:
        refs.add((m.name, p))
      elif conftest is not None and p in conftest.fixtures:
        refs.add(("conftest", p))
    return direct, refs

  def needs_torch(self, module: str, function: str, _seen=None) -> bool:
    key = (module, function)
    if key in self._fn:
      return self._fn[key]
    seen = _seen if _seen is not None else set()
    if key in seen:
      return False
    seen.add(key)
    m = self.modules.get(module)
    fn = m.functions.get(function) if m is not None else None
    if fn is None:
      return False
    direct, refs = self._refs(m, fn)
    result = direct or any(self.needs_torch(r[0], r[1], seen) for r in refs if r != key)
    if _seen is None:
      self._fn[key] = result
    return result


def unmarked_torch_tests(modules: dict[str, Module]) -> list[str]:
  """``module::test`` of every test that needs torch and is not marked parity."""
  analysis = Analysis(modules)
  missing = []
  for m in modules.values():
    if not m.name.startswith("test_"):
      continue
    module_marked = "mark.parity" in m.pytestmark
    for name, fn in m.functions.items():
      if not name.startswith("test"):   # pytest's default python_functions
        continue
      marked = module_marked or any("mark.parity" in ast.unparse(d) for d in fn.decorator_list)
      if not marked and (analysis.import_time(m.name) or analysis.needs_torch(m.name, name)):
        missing.append(f"{m.name}::{name}")
  return missing


def unguarded_torch_modules(modules: dict[str, Module]) -> list[str]:
  """Test modules that import torch at import time without the exact module-level line
  ``pytestmark = pytest.mark.parity`` that tests/conftest.py reads to leave them out of a
  ``-m "not parity"`` collection."""
  analysis = Analysis(modules)
  return [m.name for m in modules.values()
          if m.name.startswith("test_") and analysis.import_time(m.name)
          and m.pytestmark != "pytest.mark.parity"]


def test_every_torch_test_is_marked_parity():
  modules = load_modules()
  assert unmarked_torch_tests(modules) == []
  assert unguarded_torch_modules(modules) == []


def test_the_check_finds_unmarked_torch_tests():
  """The analysis itself: direct, helper-module, fixture, transitive and subprocess uses."""
  src = {
      "helper": "import torch\n",
      "util": "def load():\n  from diffusers import UNet2DConditionModel\n\ndef plain():\n  return 1\n",
      "test_a": (
          "import pytest\nfrom tests import util\nfrom tests.util import plain\n"
          "@pytest.fixture\ndef built():\n  return util.load()\n"
          "def test_fixture(built):\n  pass\n"
          "def test_plain():\n  plain()\n"
          "def test_tokenizer():\n  from transformers import CLIPTokenizer\n"
          "def test_model():\n  from transformers import CLIPTextModel\n"
          "def test_convert():\n  run(['python', '-m', 'didr_jax.convert'])\n"
          "@pytest.mark.parity\ndef test_marked():\n  import torch\n"),
      "test_b": "import pytest\nfrom tests import helper\ndef test_any():\n  pass\n",
      "test_c": ("import pytest\nfrom tests import helper\n"
                 "pytestmark = [pytest.mark.slow, pytest.mark.parity]\ndef test_any():\n  pass\n"),
      "test_d": ("import pytest\nfrom tests import helper\n"
                 "pytestmark = pytest.mark.parity\ndef test_any():\n  pass\n"),
  }
  modules = {k: Module(k, ast.parse(v)) for k, v in src.items()}
  assert unmarked_torch_tests(modules) == [
      "test_a::test_fixture", "test_a::test_model", "test_a::test_convert", "test_b::test_any"]
  assert unguarded_torch_modules(modules) == ["test_b", "test_c"]


def test_collecting_not_parity_works_without_torch():
  """With torch, torchvision, diffusers, open_clip and timm unimportable (``sys.modules[name] = None``:
  ``import`` fails and ``find_spec`` says absent, as when they are not installed), collecting
  ``-m "not parity"`` has no errors and still finds the torch-free tests."""
  code = (
      "import sys\n"
      f"for name in {sorted(TORCH_PACKAGES)!r}:\n"
      "  sys.modules[name] = None\n"
      "import pytest\n"
      "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'not parity', '-n', '0',"
      " '-p', 'no:cacheprovider', 'tests']))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "tests/test_parity_marker.py::test_every_torch_test_is_marked_parity" in proc.stdout
  assert "tests/test_trainer.py::test_preemption_notice_saves_and_stops" in proc.stdout
