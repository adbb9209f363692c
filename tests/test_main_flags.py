"""`main` turns bad input into one line and exit code 2, but a bug inside a config file keeps its
traceback: only flag, override and missing-file errors are input errors."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "-m", "didr_jax.main", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, XLA_FLAGS=""))


def test_bug_inside_a_config_file_keeps_its_traceback(tmp_path):
  path = tmp_path / "buggy.py"
  path.write_text("def get_config(arg=''):\n  groups = None\n  return groups.toy\n")
  out = _main(f"--config={path}")
  assert out.returncode not in (0, 2), out.stderr[-2000:]
  assert "Traceback" in out.stderr and str(path) in out.stderr and "return groups.toy" in out.stderr
  assert "invalid flags" not in out.stderr


@pytest.mark.parametrize("args, line", [
    (["--config=configs/toy.py:bogus"],
     "error: --config: configs/toy.py: variant 'bogus' unknown; use '' (paper) or 'fast'"),
    (["--config=configs/no_such_file.py"], "error: --config: no such file: configs/no_such_file.py"),
    (["--config=configs/toy.py", "--config.nope.x=1"], "error: config.nope.x: invalid override"),
    (["--config=configs/toy.py", "--config.toy.nope=1"], "error: config.toy.nope: invalid override"),
    (["--config=configs/toy.py", "--config.toy.beta=abc"], "error: config.toy.beta: invalid override"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, line):
  out = _main(*args, f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(line), lines[-5:]
  assert not os.path.exists(tmp_path / "w")
