"""launch/tpu_pod.sh: every worker gets the same command and its shell parses it back into exactly
the flags given (quotes, spaces and tuples intact). The SLURM script runs for real in
tests/test_t2i_cli_multihost.py (2 hosts under a stand-in srun)."""
import os
import stat
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stub(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def _argv(path):
  with open(path) as f:
    return f.read().split("\0")[:-1]


def test_tpu_pod_run_sends_every_worker_the_flags_verbatim(tmp_path):
  home = tmp_path / "home"
  # gcloud stand-in: records its arguments; the worker's python stand-in records its own
  _stub(str(tmp_path / "bin" / "gcloud"), f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {tmp_path}/gcloud_argv\n')
  _stub(str(home / "didr_jax" / ".venv" / "bin" / "python"),
        f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {tmp_path}/p.tmp && mv {tmp_path}/p.tmp {tmp_path}/python_argv\n')
  flags = ["--config=configs/sdxl.py", "--workdir=/mnt/shared/runs/a b", '--config.eval.prompts=("a cat", "it\'s $HOME")',
           "--config.train.lr=1e-6"]
  env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TPU="pod-1", ZONE="us-x1-a",
             HOME=str(home))
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run", *flags], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  argv = _argv(tmp_path / "gcloud_argv")
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1"], argv
  assert "--zone=us-x1-a" in argv and "--worker=all" in argv
  command = argv[argv.index("--command") + 1]
  subprocess.run(["bash", "-c", command], env=dict(env, HOME=str(home)), check=True, timeout=60)
  deadline = time.time() + 30          # the worker command starts the job in the background
  while not os.path.exists(tmp_path / "python_argv") and time.time() < deadline:
    time.sleep(0.1)
  assert _argv(tmp_path / "python_argv") == ["-m", "didr_jax.main", "--multihost", *flags]


def test_tpu_pod_unknown_command_and_missing_tpu_are_named():
  env = dict(os.environ, TPU="p", ZONE="z")
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "start"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "unknown command start: use setup, run or stop" in proc.stderr
  env.pop("TPU")
  proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "run"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "set TPU to the TPU VM name" in proc.stderr
