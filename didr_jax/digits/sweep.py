"""The sweep: which alignment runs exist, their names, and the default run of each method.

Run names: ``di``; ``dipp_<alpha>``, ``distar_<alpha>``; ``didr_<beta>`` with the default DRS
estimator (the first of ``sweep.didr_estimators``) and ``didr-<estimator>_<beta>`` with the others.
Scales print with ``%g`` (``dipp_4``, ``didr_0.25``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from didr_jax.objectives import ObjectiveConfig

# DRS estimators the digits experiment hands the trainer (objective.drs; "exact" needs an analytic
# prior, which digits do not have). Their settings (snis_k, snis_m, drp_k, ...) are cfg.objective's.
#   snis     - posterior samples of the guided reference, self-normalised reward weights
#   hybrid   - K=1 DRP at high SNR, snis below
#   drp      - the DRP, restricted to t <= objective.drp_t_max when that is >= 0
#   drp<T>   - the DRP restricted to t <= T (e.g. drp500)
ESTIMATOR_OBJECTIVES = {name: {"drs": name} for name in ("snis", "hybrid", "drp")}
_CUT_DRP = re.compile(r"drp(\d+)")


def estimator_objective(name: str) -> dict:
  """ObjectiveConfig fields of a DRS estimator name; ValueError for an unknown name."""
  if name in ESTIMATOR_OBJECTIVES:
    return dict(ESTIMATOR_OBJECTIVES[name])
  cut = _CUT_DRP.fullmatch(name)
  if cut:
    return {"drs": "drp", "drp_t_max": float(cut.group(1))}
  raise ValueError(f"DRS estimator {name!r} unknown; choose from {sorted(ESTIMATOR_OBJECTIVES)} or drp<T> "
                   "('exact' needs an analytic prior, which digits do not have)")


@dataclasses.dataclass(frozen=True)
class RunSpec:
  name: str
  method: str                     # di | dipp | distar | didr
  label: str                      # method with the estimator: di, dipp, distar, didr, didr-<est>
  param: str = ""                 # alpha_rew | beta | "" (DI)
  scale: Optional[float] = None
  estimator: Optional[str] = None


def run_name(method: str, scale=None, estimator=None, default_estimator=None) -> str:
  if method == "di":
    return "di"
  label = method if method != "didr" or estimator == default_estimator else f"didr-{estimator}"
  return f"{label}_{float(scale):g}"


def run_specs(cfg) -> list[RunSpec]:
  s = cfg.sweep
  default_est = s.didr_estimators[0]
  out = [RunSpec("di", "di", "di")]
  for method, scales in (("dipp", s.dipp_scales), ("distar", s.distar_scales)):
    out += [RunSpec(run_name(method, a), method, method, "alpha_rew", float(a)) for a in scales]
  for est in s.didr_estimators:
    label = "didr" if est == default_est else f"didr-{est}"
    out += [RunSpec(run_name("didr", b, est, default_est), "didr", label, "beta", float(b), est)
            for b in s.didr_betas]
  return out


def default_runs(cfg) -> dict:
  """{di, dipp, distar, didr}: the run at the config's default scale (DIDR: default estimator)."""
  s = cfg.sweep
  est = s.didr_estimators[0]
  return {"di": "di", "dipp": run_name("dipp", s.default_dipp), "distar": run_name("distar", s.default_distar),
          "didr": run_name("didr", s.default_didr, est, est)}


def objective_config(cfg, method: str, estimator: str | None = None) -> ObjectiveConfig:
  """ObjectiveConfig of a method: ``cfg.objective``, the method, the DRS estimator's fields (DIDR,
  ``sweep.estimator_objective``), weighting 'plain' for DI* (its own w(t)), and alpha_rew = beta =
  1 (the scale is ``frozen["reward_scale"]``, see ``phases``' docstring)."""
  extra = estimator_objective(estimator) if method == "didr" else {}
  if method == "distar":   # DI* has its own w(t); objective.weighting normalises the KL methods
    extra["weighting"] = "plain"
  return ObjectiveConfig.from_group(cfg.objective, method=method, alpha_rew=1.0, beta=1.0, **extra)
