"""Reward models on the synthetic arithmetic task: a CoT judge (SFT) and a value-head RM (a classifier), compared
with exact match and math-verify on held-out labelled pairs.

  python -m experiments.train_rm --config=experiments/configs/rm.py --workdir=/tmp/k15_rm
  python -m experiments.train --config=experiments/configs/arith.py --workdir=/tmp/k15_arith_cot \
      --config.rl.reward=cot_rm --config.reward.rm_path=/tmp/k15_rm

arg: "" for the CPU run, "smoke" for the seconds-long variant the tests run.
"""
import ml_collections

from experiments.configs.architectures import ARCHITECTURES
from k15.rewards.reward_model import TEMPLATE
from k15.sharding import DEFAULT_RULES, SAMPLING_RULES

VARIANTS = ("", "smoke")
BUILD = "rm_config_from_config_dict"  # the k15.config function that types this config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; one of {VARIANTS}")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.seed = 0  # data, init and sampling derive from this
  c.rms = ("cot_rm", "value_rm")  # which reward models to train

  # Both judges' shape: the tests' tiny model, a size a 2-core CPU shared with other jobs trains in minutes.
  c.model = ml_collections.ConfigDict(ARCHITECTURES["tiny"])
  c.model.vocab_size = 256  # the judge's own vocabulary: words, fractions and JSON besides the task's digits
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.attention = "auto"  # full passes: "auto" | "dense" | "blockwise" | "splash" (configs/arith.py explains)
  c.model.attention_block = 512  # query and key block of blockwise and splash attention
  c.model.logprob_chunk = 1024  # log-probs from the logits of this many positions at a time (0: all at once)
  c.model.rope_scaling = None  # plain rotary embeddings
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: the rest of the devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.dcn_data = 1  # slices that 'data' spans (multi-slice TPU runs); the sizes above are per slice
  c.sharding = ml_collections.ConfigDict()
  c.sharding.logical_axis_rules = DEFAULT_RULES  # (logical axis, mesh axes) pairs of training
  c.sharding.sampling_rules = SAMPLING_RULES  # of the CoT judge's sampling

  c.data = ml_collections.ConfigDict()
  c.data.n_train = 600 if smoke else 12000  # labelled training pairs
  c.data.n_eval = 64 if smoke else 600  # held-out pairs, of problems no training pair uses
  # distinct problems (0: n_train + n_eval); set it (e.g. 12600, the default's) to add training pairs per problem
  # while the held-out pairs stay the same
  c.data.n_problems = 0
  c.data.n_calibration = 32 if smoke else 600  # training pairs held out to fit the value RM's temperature
  c.data.levels = (1, 2, 3, 4)  # the main job's levels: answers 0-9
  c.data.tokenizer_vocab_size = 256  # SentencePiece vocabulary of the judges' corpus

  c.judge = ml_collections.ConfigDict()
  c.judge.template = TEMPLATE  # the judges' input: {question}, {reference}, {response}
  c.judge.max_input_tokens = 256  # a longer response keeps its end
  c.judge.max_new_tokens = 48  # the CoT judge's cap (its targets are ~30 tokens)
  c.judge.value_reward = "threshold"  # value RM reward: threshold (p >= threshold) | probability (calibrated)
  c.judge.threshold = 0.5

  c.cot = ml_collections.ConfigDict()  # the CoT RM: SFT on short traces ending in the JSON verdict
  c.cot.steps = 20 if smoke else 600
  c.cot.batch_size = 16 if smoke else 32
  c.cot.learning_rate = 3e-3  # peak of a warm-up + cosine schedule
  c.cot.warmup_steps = 5 if smoke else 50
  # Loss weight of the CoT RM's judging (the lines after "Final answer: ...", which only copies): at weight 1 the
  # copied lines dominate the loss and 600 steps left the "Match" decision near chance (57.5% held-out)
  c.cot_judging_weight = 10.0
  # The CoT RM's target: "value" names the answer's value at once (93.5% held-out at 0.62M params, docs/results.md);
  # "steps" computes it ("3*2=6, 6+2=8"; a fraction: the reference times the denominator), which a continued
  # 0.62M judge learned less well (92.2%)
  c.cot_trace = "value"
  c.value = ml_collections.ConfigDict()  # the value RM: binary cross-entropy on the label
  c.value.steps = 20 if smoke else 600
  c.value.batch_size = 16 if smoke else 32
  c.value.learning_rate = 3e-3
  c.value.warmup_steps = 5 if smoke else 50
  # The value RM's transformer at the start: scratch (random, like the CoT RM) | cot_rm (the trained CoT RM's, a
  # stand-in for the pretrained model a value RM usually starts from)
  c.value_init = "scratch"
  # The CoT RM's params at the start: scratch | a CoT judge's directory (<workdir>/cot_rm of an earlier run with
  # the same data/, whose tokenizer it must share): continues training it on this run's targets
  c.cot_init = "scratch"

  c.sampling = ml_collections.ConfigDict()  # the CoT judge's sampler; it decodes greedily
  c.sampling.temperature = 1.0  # unused by the judge (greedy); > 0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0
  c.sampling.chunk_size = 16  # decode steps per dispatch; slots are refilled between chunks
  c.sampling.num_slots = 32  # concurrent judgements
  c.sampling.repeat_ngram = 8  # a judge that loops stops ("repeat") and has no verdict
  c.sampling.repeat_count = 4
  c.sampling.page_size = 16  # positions per page of the paged KV cache
  c.sampling.num_pages = 0  # 0: every slot can reach the longest sequence at once
  c.sampling.backend = "k15.sampling.native"  # "model" or a plug-in module (configs/arith.py explains)
  c.sampling.backend_options = ml_collections.ConfigDict({"matmul": "auto"})
  c.math_timeout_s = 60.0  # per-item timeout of math-verify in the comparison (a CPU shared with other jobs is slow)
  return c
