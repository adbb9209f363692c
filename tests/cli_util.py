"""Shared helper of the CLI tests: interrupt a run with SIGTERM once a log line appears."""
import signal
import subprocess


def run_until_then_sigterm(cmd, *, cwd, env, marker: str, timeout: float):
  """Start ``cmd``, send SIGTERM at the first stderr line containing ``marker``, wait for the exit.

  Returns (return code, all of stderr).
  """
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True)
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if marker in line:
        proc.send_signal(signal.SIGTERM)
        break
    lines.append(proc.communicate(timeout=timeout)[1])
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, "".join(lines)
