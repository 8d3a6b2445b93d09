"""Reading compiled HLO text: the collectives one iteration of a while loop runs, nested loops counted; the bytes
a run's executed ops write, from jax's profiler."""
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import jax

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter", "all-reduce-start",
               "all-gather-start", "collective-permute-start")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_NAMED = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+[a-z][\w\-]*\(", re.M)
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def computations(text: str) -> Dict[str, List[str]]:
  """Computation name -> its instruction lines ('ENTRY' also names the entry computation)."""
  out, name = {}, None
  for line in text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      name = header.group(2)
      out[name] = []
      if header.group(1):
        out["ENTRY"] = out[name]
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line)
  return out


def array_shapes(type_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
  """(dtype, dims) of every array in an HLO type (an array or a tuple of them)."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_text)]


def type_bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in array_shapes(type_text):
    n = 1
    for d in dims:
      n *= d
    total += n * DTYPE_BYTES[dtype]
  return total


def _trip_count(line: str) -> Optional[int]:
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  return int(found.group(1)) if found else None


def collectives(comps: Dict[str, List[str]], name: str, seen=()) -> List[Tuple[str, int]]:
  """(opcode, result bytes) of every collective that one run of computation `name` performs, a nested while loop's
  counted by its known trip count. A loop of unknown trip count that holds collectives is an error (its count is
  data-dependent)."""
  out = []
  for line in comps[name]:
    found = _INSTRUCTION.match(line)
    if not found:
      continue
    type_text, opcode = found.groups()
    if opcode in COLLECTIVES:
      out.append((opcode, type_bytes(type_text)))
    if opcode == "while":
      body = re.search(r"body=%?([\w.\-]+)", line).group(1)
      cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
      inner = collectives(comps, body, seen + (name,)) + collectives(comps, cond, seen + (name,))
      trips = _trip_count(line)
      if inner and trips is None:
        raise ValueError(f"a loop of unknown trip count in {name} holds collectives: {inner}")
      out += inner * (trips or 0)
    else:
      for called in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line):
        if called in comps and called not in seen:
          out += collectives(comps, called, seen + (name,))
  return out


def loop_collectives(text: str, op_name: str) -> List[Tuple[str, int]]:
  """The collectives of one iteration (body and condition) of the while loop whose metadata op_name is
  `op_name` (e.g. "jit(decode_chunk)/while")."""
  comps = computations(text)
  for lines in comps.values():
    for line in lines:
      if f'op_name="{op_name}"' in line and _INSTRUCTION.match(line) and _INSTRUCTION.match(line).group(2) == "while":
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
        return collectives(comps, body) + collectives(comps, cond)
  raise ValueError(f"no while loop named {op_name!r} in the HLO")


def sorts(text: str) -> List[Tuple[Tuple[int, ...], ...]]:
  """The operand shapes of every sort instruction."""
  out = []
  for lines in computations(text).values():
    for line in lines:
      found = _INSTRUCTION.match(line)
      if found and found.group(2) == "sort":
        out.append(tuple(dims for _, dims in array_shapes(found.group(1))))
  return out


def executed_bytes(compiled, *args) -> int:
  """The bytes that the ops of one run of `compiled` (a jax.stages.Compiled) write, summed over the ops the runtime
  executed, as jax's profiler records them: a loop's ops count once per trip it really ran."""
  result_bytes = {name: type_bytes(type_text) for name, type_text in _NAMED.findall(compiled.as_text())}
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(compiled(*args))
    trace = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  ops = [e["args"]["hlo_op"] for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  if not ops:
    raise ValueError("the profiler recorded no executed ops")
  return sum(result_bytes.get(op, 0) for op in ops)
