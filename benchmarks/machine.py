"""The machine's load around a benchmark. On a shared machine a comparison measured while other
work runs is not a result (the UNet's torch ratio moved from 3.26x to 0.67x between a busy and a
quiet machine), so every benchmark prints the load before and after, and the ones that compare two
implementations print the ratio only when the machine was quiet before the run, unless forced."""
import os

QUIET_LOAD = 1.0   # 1-minute load average before the run


def load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


class LoadRecord:
  """Prints the load when created and at ``done()``; ``done()`` says whether ratios may be printed.
  ``force`` None: the benchmark prints no ratios (the load is recorded only)."""

  def __init__(self, force: bool | None = None):
    self.force, self.before = force, load()
    print(f"load before: {self.before} (1, 5, 15 min; {os.cpu_count()} cores)", flush=True)

  def done(self) -> bool:
    after = load()
    print(f"load after: {after} (includes this run)")
    quiet = self.before[0] < QUIET_LOAD
    if not quiet and self.force is False:
      print(f"1-minute load {self.before[0]} >= {QUIET_LOAD} before the run: ratios not printed "
            f"(rerun on a quiet machine, or pass --force)")
    return quiet or self.force
