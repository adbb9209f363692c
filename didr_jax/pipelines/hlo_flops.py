"""Matmul and convolution FLOPs of a program, with every loop counted as many times as it runs.

XLA's cost analysis counts a while loop's body once: a program that scans over 30 stacked DiT
layers (or over the DRP's K steps, or a chunk's outer steps) reports the FLOPs of one iteration.
This reads the program's HLO text as JAX lowers it (``lowered.as_text(dialect="hlo")``: the whole
program before partitioning and before the TPU compiler rewrites convolutions and batched matmuls
into padded or dilated forms): each ``dot`` / ``convolution`` costs 2 x (output elements) x
(contracted elements per output), and each computation is weighted by how often it runs (a while
body by its trip count, read from the loop's condition ``counter < N`` with a constant start, as
``lax.scan`` / ``fori_loop`` lower). Rematerialised forward passes are in that text, so they are
counted, and so are the products with a convolution's zero padding (not those with the zeros a
strided convolution's gradient inserts: ``lhs_dilate``). Elementwise work is not (a
few percent of a transformer's or UNet's FLOPs); conditional branches are all counted.
"""
from __future__ import annotations

import math
import re

_NAME = r"%?([\w.\-]+)"
_COMPUTATION = re.compile(rf"^(ENTRY )?{_NAME}\s*(?:\(.*\)\s*->\s*.*)?\{{\s*$")
_INSTRUCTION = re.compile(rf"^\s*(?:ROOT )?{_NAME} = (.*)$")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]\S*\s+([\w-]+)\((.*)$")
_OP = re.compile(r"^.*?\s([\w-]+)\((.*)$")
_CALLEE = re.compile(rf"\b(calls|to_apply|body|condition|true_computation|false_computation)={_NAME}")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


class HloParseError(ValueError):
  """HLO text this counter cannot read (no entry, a loop without a readable trip count, ...)."""


def _dims(s: str) -> tuple[int, ...]:
  return tuple(int(d) for d in s.split(",") if d)


def _split_args(rest: str) -> tuple[list[str], str]:
  """(operand names, attributes) of the text after ``op(``; operands may carry their types."""
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(rest[i], 0)
    i += 1
  inner, attrs = rest[:i - 1], rest[i:]
  parts, depth, cur = [], 0, ""
  for ch in inner:
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  parts.append(cur)
  return [p.split()[-1].lstrip("%") for p in parts if p.strip()], attrs


def parse(text: str):
  """({computation: [instruction text after "name = "] keyed by name}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and " = " not in line:
      current = m.group(2)
      comps[current] = {}
      if m.group(1):
        entry = current
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      i = _INSTRUCTION.match(line)
      if i:
        comps[current][i.group(1)] = (i.group(2), line.lstrip().startswith("ROOT"))
  if entry is None:
    raise HloParseError("no ENTRY computation in the HLO text")
  return comps, entry


def _op_flops(op: str, out: tuple, operands: list, attrs: str, shapes: dict) -> float:
  if op == "dot":
    lhs = shapes[operands[0]]
    contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1))
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
  if op == "convolution":
    rhs = shapes[operands[1]]
    labels = re.search(r"dim_labels=\w+_(\w+)->\w+", attrs).group(1)
    # each output element contracts the kernel's window and its input features, |rhs| / |o|
    # (with feature or batch groups as well: the kernel's i is per group, the output's batch too)
    # a dilated input (the gradient of a strided convolution) is mostly inserted zeros: on average
    # one window position in prod(lhs_dilate) meets an input element
    dilate = re.search(r"lhs_dilate=([\dx]+)", attrs)
    zeros = math.prod(int(d) for d in dilate.group(1).split("x")) if dilate else 1
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[labels.index("o")] / zeros
  return 0.0


def _constant_of(name, defs: dict):
  """The integer a scalar traces back to through copies / converts / bitcasts, else None."""
  for _ in range(64):
    op, value = defs.get(name, (None, None))
    if op == "constant":
      return value
    if op not in ("copy", "bitcast", "convert") or not value:
      return None
    name = value[0]
  return None


def _trip_count(cond: dict, init: str, defs: dict) -> int:
  """N - start of a loop whose condition is ``tuple[k] < N`` from a constant start."""
  root = next((body for body, is_root in cond.values() if is_root), "")
  m = re.search(rf"compare\((?:\S+ )?{_NAME}, (?:\S+ )?{_NAME}\), direction=LT", root)
  if m:
    counter, bound = cond.get(m.group(1), ("", 0))[0], cond.get(m.group(2), ("", 0))[0]
    k, n = re.search(r"get-tuple-element\(.*index=(\d+)", counter), re.search(r" constant\((-?\d+)\)", bound)
    op, elements = defs.get(init, (None, []))
    if k and n and op == "tuple" and int(k.group(1)) < len(elements):
      start = _constant_of(elements[int(k.group(1))], defs)
      if start is not None:
        return max(int(n.group(1)) - start, 0)
  raise HloParseError(f"a while loop's trip count is not `counter < constant` from a constant "
                      f"start: {root.strip()[:160]}")


def _graph(text: str):
  """(entry, {computation: [(FLOPs, op_name) of its dots and convolutions]},
  {computation: [(callee, runs per call)]})."""
  comps, entry = parse(text)
  shapes, defs, ops, calls = {}, {}, {}, {}
  for comp, body in comps.items():
    for name, (text_, _) in body.items():
      a = _ARRAY.match(text_)
      m = a or _OP.match(text_)
      if not m:
        continue
      op, rest = (a.group(3), a.group(4)) if a else (m.group(1), m.group(2))
      operands, attrs = _split_args(rest)
      if op == "constant":
        c = re.match(r"(-?\d+)\)", rest)
        defs[name] = ("constant", int(c.group(1)) if c else None)
      else:
        defs[name] = (op, operands)
      if a:
        shapes[name] = _dims(a.group(2))
        flops = _op_flops(op, shapes[name], operands, attrs, shapes)
        if flops:
          where = re.search(r'op_name="([^"]*)"', attrs)
          ops.setdefault(comp, []).append((flops, where.group(1) if where else name))
  for comp, body in comps.items():
    for name, (text_, _) in body.items():
      callees = _CALLEE.findall(text_)
      b = _BRANCHES.search(text_)
      if b:
        callees += [("branch", n.strip().lstrip("%")) for n in b.group(1).split(",") if n.strip()]
      for kind, callee in callees:
        times = 1
        if kind == "body":
          cond = re.search(rf"condition={_NAME}", text_).group(1)
          times = _trip_count(comps[cond], defs[name][1][0], defs)
        calls.setdefault(comp, []).append((callee, times))
  return entry, ops, calls


def flops_by_op(text: str) -> dict[str, float]:
  """{op_name (JAX's name stack of the dot / convolution): FLOPs per run of the program}."""
  entry, ops, calls = _graph(text)
  subtree = {}

  def has_flops(comp: str, depth: int = 0) -> bool:
    if comp not in subtree:
      if depth > 200:
        raise HloParseError(f"computation {comp}: call depth over 200")
      subtree[comp] = bool(ops.get(comp)) | any([has_flops(c, depth + 1) for c, _ in calls.get(comp, [])])
    return subtree[comp]

  out = {}

  def visit(comp: str, runs: float):
    for flops, where in ops.get(comp, []):
      out[where] = out.get(where, 0.0) + runs * flops
    for callee, times in calls.get(comp, []):
      if times and has_flops(callee):
        visit(callee, runs * times)
  visit(entry, 1.0)
  return out


def program_flops(text: str) -> float:
  """Matmul + convolution FLOPs of one run of the HLO module in ``text``, loop bodies times their
  trip counts (for JAX's lowered text: the whole program, all devices together)."""
  return sum(flops_by_op(text).values())
