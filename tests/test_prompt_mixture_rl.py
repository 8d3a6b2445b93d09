"""Prompt files -> seqio Mixture -> the RL loop's prompt sampler, with math-verify rewards."""
import json
import os

import numpy as np
import pytest

from experiments import train as main_job
from experiments.configs import qwen_math
from k15 import config as config_lib
from k15.rewards.verifiers import Verifier
from k15.rl import loop
from k15.sampling import Trajectory

class _CharTokenizer:
  """Token i is chr(i): enough to carry hand-written response texts through build_batch."""
  pad_id, eos_id = 0, 1

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i > 1)


def _traj(prompt_id, sample_index, text):
  tokens = [ord(c) for c in text] + [1]
  return Trajectory(prompt_id=prompt_id, sample_index=sample_index, prompt_tokens=[5, 6], response_tokens=tokens,
                    logprobs=[-0.5] * len(tokens), token_iterations=[1] * len(tokens), finish_reason="eos")


def test_verifier_dispatches_by_domain():
  examples = [
      {"domain": "math", "answer": "Each day ... #### 12"},  # GSM8K-style reference
      {"domain": "math", "answer": "1/2"},
      {"domain": "math", "answer": "\\frac{5}{6}"},
      {"answer": "7"},  # no domain: the default (arith)
      {"domain": "code", "test_cases": [{"input": "1 2\n", "output": "3\n"}]},
  ]
  texts = ["so the total is \\boxed{12}", "The answer is 0.5", "\\boxed{\\frac{1}{6}}", "Answer: 7",
           "```python\na, b = map(int, input().split())\nprint(a - b)\n```"]
  with Verifier(default_domain="arith") as verifier:
    np.testing.assert_array_equal(verifier(texts, examples), [1, 1, 0, 1, 0])
    assert verifier.reasons["correct"] == 3
  with pytest.raises(ValueError, match="domain 'chess'"):
    Verifier()(["x"], [{"domain": "chess", "answer": "1"}])


def test_build_batch_scores_groups_with_math_verify():
  rl = config_lib.from_config_dict(qwen_math.get_config("smoke")).rl
  G = rl.samples_per_prompt
  examples = [{"domain": "math", "answer": "#### 12"}, {"domain": "math", "answer": "(-2, 2)"}]
  texts = [["\\boxed{12}", "\\boxed{12.0}", "\\boxed{13}", "no idea"][:G],
           ["\\boxed{(-2,2)}", "\\boxed{[-2,2]}", "the answer is (-2, 2)", "\\boxed{2}"][:G]]
  groups = [[_traj(g, j, t) for j, t in enumerate(ts)] for g, ts in enumerate(texts)]
  with Verifier(default_domain="math") as verifier:
    batch, correct, metrics = loop.build_batch(groups, examples, _CharTokenizer(), verifier, 0.0, rl)
  np.testing.assert_array_equal(correct, [[1, 1, 0, 0], [1, 0, 1, 0]][:2])
  np.testing.assert_array_equal(batch["rewards"], correct.reshape(-1))
  assert metrics["accuracy"] == 0.5


@pytest.fixture(scope="module")
def mixture_run(math_main_job):
  workdir, config, summary = math_main_job
  tokenizer, train, eval_ = main_job.load_task(config, workdir)
  return workdir, config, tokenizer, train, eval_, summary


def test_mixture_feeds_the_prompt_pool(mixture_run, prompt_files):
  _, config, tokenizer, train, eval_, _ = mixture_run
  gsm = {json.loads(l)["question"] for l in open(prompt_files["gsm8k_style"])}
  maths = {json.loads(l)["problem"] for l in open(prompt_files["math_style"])}
  questions = [ex["question"] for ex in train]
  assert len(train) == config.data.num_train
  assert set(questions) <= gsm | maths
  assert set(questions) & gsm and set(questions) & maths  # both files flow into the pool
  ex = next(ex for ex in train if ex["question"] in maths)
  assert ex["domain"] == "math" and ex["difficulty"] in (1, 2, 3) and "\\boxed" in ex["answer"]  # field_map
  assert tokenizer.decode(ex["inputs_ids"]) == config.data.template.format(question=ex["question"])
  assert len(eval_) == len(gsm) + len(maths)
  sampler = loop.make_prompt_sampler(config.rl, train, config.seed)
  assert sampler.difficulty_N is None  # GSM8K lines carry no difficulty: no curriculum, priority only
  assert len(set(sampler.sample(config.rl.prompts_per_iteration, 1))) == config.rl.prompts_per_iteration


def test_rl_smoke_run_with_math_rewards(mixture_run):
  workdir, config, *_, summary = mixture_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, "rl.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, config.rl.iterations + 1))
  trained = [r for r in rows if r.get("groups_trained")]
  assert trained and all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss/loss"]) for r in trained)
  assert 0.0 <= summary["k1.5 RL"]["accuracy"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "final", "model.safetensors"))


def test_prompt_too_long_names_the_prompt(tmp_path):
  config = qwen_math.get_config("smoke")
  config.data.max_prompt_len = 4
  with pytest.raises(ValueError, match="max_prompt_len=4"):
    main_job.load_task(config_lib.from_config_dict(config), str(tmp_path))
