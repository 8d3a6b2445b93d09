"""What the experiments' figures share: matplotlib without a display, and one way to finish and save a figure.

matplotlib is imported inside the functions: importing an experiment module does not load it.
"""
from typing import Optional, Sequence


def pyplot():
  """matplotlib.pyplot on the Agg backend: figures go to files, also on machines without a display (TPU VMs, CI)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save(fig, axes: Sequence, png_path: str, legend_on: Sequence = (), title: Optional[str] = None, dpi: int = 100):
  """Grids every axis of `axes`, adds a legend to those of `legend_on` and the figure's title, writes the figure to
  png_path and closes it (pyplot keeps open figures alive); returns png_path."""
  for ax in axes:
    ax.grid(alpha=0.3)
  for ax in legend_on:
    ax.legend(fontsize=8)
  if title is not None:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=dpi)
  pyplot().close(fig)
  return png_path
