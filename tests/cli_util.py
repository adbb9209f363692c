"""Shared helpers of the CLI and multi-process tests: interrupt a run with a signal once a log
line appears (the whole run, or chosen processes of a multi-process run); a free local port for a
coordinator; the small toy run's flags."""
import os
import signal
import socket
import subprocess
import threading

# configs/toy.py:fast shrunk to a run of seconds (networks of width 16, 400 + 200 + 200 steps)
TOY_SMALL = ["--config.reference.steps=400", "--config.distill.steps=200", "--config.align.steps=200",
             "--config.reference.batch=256", "--config.distill.batch=256", "--config.align.batch=256",
             "--config.eval.num_samples=2000", "--config.eval.drp_bias_samples=400",
             "--config.checkpoint.every_steps=100", "--config.network.width=16", "--config.generator.width=16",
             "--config.train.log_every_chunks=1", "--config.distill.pool_size=4096",
             "--config.reference.optimizer.lr=3e-4", "--config.align.gen_optimizer.lr=1e-4"]


def run_until_then_signal(cmd, *, cwd, env, marker: str, timeout: float, signum: int = signal.SIGTERM):
  """Start ``cmd``, send ``signum`` (SIGTERM: a graceful stop; SIGKILL: a crash) at the first stderr
  line containing ``marker``, wait for the exit.

  Returns (return code, all of stderr).
  """
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if marker in line:
        proc.send_signal(signum)
        break
    lines.append(proc.communicate(timeout=timeout)[1])
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, "".join(lines)


def run_signalling_processes(cmd, *, cwd, env, schedule, timeout: float):
  """Start ``cmd`` in its own process group; ``schedule`` is [(marker, pid_of), ...]: at the first
  stderr line containing ``marker`` (in schedule order) send SIGTERM to the process ``pid_of()``
  names (one task of a multi-process run). The whole group is killed after ``timeout`` seconds
  (runs that wait on each other forever end there).

  Returns (return code, all of stderr, markers whose signal reached a live process).
  """
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, start_new_session=True)
  timed_out = threading.Event()

  def kill_group():
    timed_out.set()
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  killer = threading.Timer(timeout, kill_group)
  killer.start()
  lines, pending, delivered = [], list(schedule), []
  try:
    for line in proc.stderr:
      lines.append(line)
      while pending and pending[0][0] in line:
        marker, pid_of = pending.pop(0)
        try:
          os.kill(pid_of(), signal.SIGTERM)
          delivered.append(marker)
        except ProcessLookupError:   # that process has already exited
          pass
    proc.wait()
  finally:
    killer.cancel()
    if proc.poll() is None:
      kill_group()
      proc.wait()
  if timed_out.is_set():
    lines.append(f"\n[the run was killed after {timeout:.0f}s]\n")
  return proc.returncode, "".join(lines), delivered


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
