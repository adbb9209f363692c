"""Pareto dominance between runs scored on several metrics."""
from __future__ import annotations


def dominated_by(points: dict, maximize: tuple) -> dict:
  """{run: [runs that dominate it]} for points {run: (m_1, ..., m_k)}; ``maximize[i]`` says whether
  a larger m_i is better. b dominates a when b is at least as good on every metric and better on one."""
  def at_least(b, a, up):
    return b >= a if up else b <= a
  out = {}
  for a, pa in points.items():
    out[a] = sorted(b for b, pb in points.items() if b != a
                    and all(at_least(y, x, up) for x, y, up in zip(pa, pb, maximize))
                    and any(y != x for x, y in zip(pa, pb)))
  return out
