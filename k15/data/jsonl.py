"""JSON Lines files (one JSON value per line): the task files, prompt files and metrics. Errors name file and line.

Paths may be local or URLs (k15.storage); a file is written whole.
"""
import json
from typing import Any, Iterable, Iterator

from k15 import storage


def records(path: str) -> Iterator[tuple[str, Any]]:
  """("path:line", value) for every non-empty line; a malformed line raises naming it."""
  with storage.open(path) as f:
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
  storage.write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
