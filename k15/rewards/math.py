"""Verifiable math: the final answer of a response, and its equivalence to the reference with math-verify.

`score_one` may run for unbounded time on a pathological expression (sympy has no interrupt points inside
big-integer arithmetic): call it through `k15.rewards.math_pool.MathVerifierPool`, never in the trainer.
math_verify (and so sympy) is imported on first use, so importing this module for extraction stays light.
"""
import dataclasses
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """A verifier's verdict: the reward and why (logged; "correct" when the reward is 1)."""
  reward: float
  reason: str


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is\s*:?|:)", re.IGNORECASE)
_HASHES = re.compile(r"####")
# A sentence end inside "the answer is ...": a period before whitespace or the end; "3.5" keeps its point.
_SENTENCE = re.compile(r"(.*?)(?:\.(?:\s|$)|$)")
# "72 dollars": a number then plain words. math-verify drops known units ("5 cm") but multiplies unknown words in.
_NUMBER_THEN_WORDS = re.compile(r"([-+]?(?:\\\$|\$)?\s*\d[\d,]*(?:\.\d+)?)\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*")
_MATH_WORDS = {"pi", "sqrt", "i", "e", "infty"}  # "2 pi" is a number, not "2" and a unit


def _braced(text: str, open_brace: int) -> Optional[str]:
  """The content of the brace group opening at text[open_brace]; None if it never closes (a truncated response)."""
  depth = 0
  for i in range(open_brace, len(text)):
    if text[i] == "{" and text[i - 1] != "\\":  # an escaped brace \{ or \} (a set) does not nest
      depth += 1
    elif text[i] == "}" and text[i - 1] != "\\":
      depth -= 1
      if depth == 0:
        return text[open_brace + 1:i]
  return None


def _rest_of_line(text: str, start: int) -> str:
  end = text.find("\n", start)
  return text[start:] if end < 0 else text[start:end]


def _candidates(text: str) -> list[tuple[int, str]]:
  """(position, answer text) of every final-answer marker in the text."""
  found = []
  for m in _BOXED.finditer(text):
    content = _braced(text, m.end() - 1)
    if content is not None:
      found.append((m.start(), content))
  for m in _ANSWER_IS.finditer(text):
    found.append((m.start(), _SENTENCE.match(_rest_of_line(text, m.end()).strip()).group(1)))
  for m in _HASHES.finditer(text):
    found.append((m.start(), _rest_of_line(text, m.end())))
  return found


def _clean(answer: str) -> str:
  """Strips the math delimiters and sentence punctuation around an answer and trailing unit words."""
  answer = answer.strip().rstrip(".").strip()
  for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
      answer = answer[len(left):-len(right)].strip()
      break
  m = _NUMBER_THEN_WORDS.fullmatch(answer)
  if m and not _MATH_WORDS & set(answer[m.end(1):].split()):
    answer = m.group(1)
  return answer


def extract_answer(text: str) -> Optional[str]:
  """The final answer: the LAST of `\\boxed{...}` (nested braces), "the answer is X" / "Answer: X", "#### X".

  Only the last marker counts, so a response cannot hedge with several answers. None if there is none or it
  is empty.
  """
  found = _candidates(text)
  if not found:
    return None
  answer = _clean(max(found, key=lambda c: c[0])[1])
  return answer or None


def _parse(answer: str) -> list:
  """[sympy value, text] of a LaTeX answer; only [text] if the whole answer does not parse.

  LaTeX extraction only: math-verify's default fallback reads the first number out of malformed LaTeX, so
  `1 +` and `\\left( 1 + \\right` would parse as 1. Without a value, only the text can match, so they are wrong.
  """
  import math_verify  # pylint: disable=g-import-not-at-top  # sympy: heavy, and only the workers need it
  # Timeouts off: math-verify's SIGALRM timer cannot interrupt sympy's C loops; the pool kills the worker.
  return math_verify.parse(f"${answer}$", extraction_config=[math_verify.LatexExtractionConfig()],
                           parsing_timeout=None)


def equivalent(reference: str, answer: str) -> bool:
  """math-verify equivalence of two bare answers (the reference is the gold side: verify is asymmetric)."""
  return _verify(_parse(reference), _parse(answer))


def _verify(gold: list, parsed: list) -> bool:
  import math_verify  # pylint: disable=g-import-not-at-top
  return bool(math_verify.verify(gold, parsed, timeout_seconds=None))


def score_one(response: str, reference: str) -> RewardResult:
  """1.0 if the response's final answer is equivalent to the reference, else 0.0 with the reason.

  A reference may be a bare answer ("1/2") or a worked solution with a marker (GSM8K's "... #### 72").
  """
  answer = extract_answer(response)
  if answer is None:
    return RewardResult(0.0, "no final answer")
  gold = extract_answer(reference) or _clean(reference)
  parsed_gold, parsed = _parse(gold), _parse(answer)
  if not parsed_gold:
    return RewardResult(0.0, f"unparsable reference {gold[:80]!r}")
  if not parsed:
    return RewardResult(0.0, f"unparsable answer {answer[:80]!r}")
  if _verify(parsed_gold, parsed):
    return RewardResult(1.0, "correct")
  return RewardResult(0.0, f"wrong answer {answer[:80]!r}")
