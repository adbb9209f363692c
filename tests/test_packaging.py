"""``pip install .`` installs the library with the pinned runtime stack: pyproject.toml declares a
build backend, the dependencies of requirements.txt, a ``test`` extra equal to
requirements-test.txt, and a package list that holds every module of didr_jax."""
import os
import tomllib

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name: str) -> list[str]:
  out = []
  with open(os.path.join(ROOT, name)) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line and not line.startswith("-r"):
        out.append(line)
  return out


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_dependencies_equal_the_requirements_files():
  project = _pyproject()["project"]
  assert project["dependencies"] == _requirements("requirements.txt")
  assert project["optional-dependencies"]["test"] == _requirements("requirements-test.txt")
  assert not any(d.split("=")[0] in ("torch", "diffusers") for d in project["dependencies"])


def test_build_backend_and_packages_cover_every_module():
  py = _pyproject()
  assert py["build-system"]["build-backend"] == "setuptools.build_meta"
  found = set(setuptools.find_packages(ROOT, **py["tool"]["setuptools"]["packages"]["find"]))
  folders = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "didr_jax"))
             if any(f.endswith(".py") for f in files)}
  assert folders - found == set(), "folders of didr_jax modules that `pip install .` would leave out"
