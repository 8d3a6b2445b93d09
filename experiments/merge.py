"""Model merging (long2short): writes the weighted average of two HF checkpoints of the same architecture.

  python -m experiments.merge --a=/tmp/k15_l2s/models/long --b=/tmp/k15_l2s/models/short \
      --weights=0.5,0.5 --out=/tmp/merged
"""
from absl import app, flags

_A = flags.DEFINE_string("a", None, "First checkpoint directory (e.g. the long-CoT model).")
_B = flags.DEFINE_string("b", None, "Second checkpoint directory (e.g. the short-CoT model).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the merged checkpoint to.")
_WEIGHTS = flags.DEFINE_list("weights", ["0.5", "0.5"], "w_a,w_b: non-negative, summing to 1.")
flags.mark_flags_as_required(["a", "b", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    weights = tuple(float(w) for w in _WEIGHTS.value)
  except ValueError:
    raise app.UsageError(f"--weights must be two numbers, got {_WEIGHTS.value}") from None
  if len(weights) != 2:
    raise app.UsageError(f"--weights must be two numbers, got {_WEIGHTS.value}")
  from k15.long2short import merge
  cfg, _ = merge.merge_checkpoints(_A.value, _B.value, _OUT.value, weights)
  print(f"merged {weights[0]:g} x {_A.value} + {weights[1]:g} x {_B.value} -> {_OUT.value} "
        f"({cfg.num_params() / 1e6:.2f}M params)")


if __name__ == "__main__":
  app.run(main)
