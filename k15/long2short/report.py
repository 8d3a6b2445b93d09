"""The long2short efficiency report (the report's figure 7): accuracy against mean response tokens per variant."""
import csv
from typing import Mapping

COLUMNS = ("variant", "accuracy", "mean_tokens", "tokens_per_correct", "token_change", "accuracy_change_points")


def rows_against(results: Mapping[str, dict], baseline: str = "long") -> list[dict]:
  """One row per variant (in order) with its token change (fraction) and accuracy change (points) against baseline."""
  if baseline not in results:
    raise ValueError(f"baseline variant {baseline!r} not among the results {list(results)}")
  base = results[baseline]
  rows = []
  for name, r in results.items():
    rows.append({
        "variant": name,
        "accuracy": r["accuracy"],
        "mean_tokens": r["mean_tokens"],
        "tokens_per_correct": r["tokens_per_correct"],
        "token_change": r["mean_tokens"] / base["mean_tokens"] - 1.0,
        "accuracy_change_points": 100.0 * (r["accuracy"] - base["accuracy"]),
    })
  return rows


def markdown_table(rows: list[dict], descriptions: Mapping[str, str] = None) -> str:
  descriptions = descriptions or {}
  lines = ["| variant | held-out accuracy | mean response tokens | tokens per correct answer | tokens vs long "
           "| accuracy vs long |", "|---|---|---|---|---|---|"]
  for r in rows:
    name = r["variant"] + (f" ({descriptions[r['variant']]})" if r["variant"] in descriptions else "")
    lines.append(f"| {name} | {r['accuracy']:.1%} | {r['mean_tokens']:.1f} | {r['tokens_per_correct']:.1f} "
                 f"| {r['token_change']:+.1%} | {r['accuracy_change_points']:+.1f} pts |")
  return "\n".join(lines)


def write_csv(path: str, rows: list[dict]):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path: str, rows: list[dict], title: str = "long2short: accuracy vs mean response tokens"):
  """Scatter of held-out accuracy against mean response tokens, one labelled point per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  markers = "os^Dv<>Pp*X"
  for i, r in enumerate(rows):  # a legend, not labels at the points: variants that change little overlap
    ax.scatter(r["mean_tokens"], 100 * r["accuracy"], s=50, marker=markers[i % len(markers)], label=r["variant"])
  ax.set(xlabel="mean response tokens (held-out)", ylabel="held-out accuracy (%)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
