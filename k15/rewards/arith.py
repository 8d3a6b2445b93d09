"""Verifier of the arithmetic task: the last "Answer: <int>" must equal the reference."""
import re
from typing import Optional

_ANSWER = re.compile(r"Answer\s*:")
# An integer alone on the rest of its line (a full stop allowed): "3.5", "12abc", "1/2" or "0=8" are not answers,
# so garbled output that happens to start with the right digit earns nothing.
_INT = re.compile(r"\s*([+-]?\d+)\.?[ \t]*(?:\n|$)")


def extract_answer(text: str) -> Optional[str]:
  """The integer after the LAST "Answer:" marker, normalized ("-007" -> "-7"); None if absent or not an int.

  Only the last marker counts, so a response cannot hedge with several answers.
  """
  markers = list(_ANSWER.finditer(text))
  if not markers:
    return None
  m = _INT.match(text, markers[-1].end())
  return None if m is None else str(int(m.group(1)))


def arith_reward(response_text: str, reference_answer: str) -> float:
  """1.0 when the response's final answer equals the reference integer, else 0.0."""
  answer = extract_answer(response_text)
  return float(answer is not None and int(answer) == int(reference_answer.strip()))
