"""JSON Lines files (one JSON value per line): the task files, prompt files and metrics. Errors name file and line."""
import json
import os
from typing import Any, Iterable, Iterator


def records(path: str) -> Iterator[tuple[str, Any]]:
  """("path:line", value) for every non-empty line; a malformed line raises naming it."""
  with open(path) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield f"{path}:{lineno}", json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON line: {e}") from e


def read(path: str) -> list:
  return [value for _, value in records(path)]


def write(path: str, rows: Iterable[Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
