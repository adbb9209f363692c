"""Shared helpers of the CLI and multi-process tests: interrupt a run with a signal once a log
line appears; a free local port for a coordinator."""
import signal
import socket
import subprocess


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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
