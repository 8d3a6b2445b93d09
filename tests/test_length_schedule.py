"""The length schedule (config.rl.length_schedule): its checks, its values per iteration, and the RL loop applying
it to new and buffered partial rollouts."""
import jax
import numpy as np
import pytest

from experiments import train as main_job
from experiments.configs import arith
from k15 import config as config_lib
from k15.rl import loop
from k15.rl import metrics as metrics_lib


def _config(**rl):
  config = arith.get_config("smoke")
  config.rl.update(rl)
  return config


@pytest.mark.parametrize("schedule, message", [
    (((1, 64, 32),), r"config.rl.length_schedule\[0\].from_iteration: must be >= 2, got 1"),
    (((5, 64, 32), (5, 96, 32)), r"config.rl.length_schedule\[1\].from_iteration: must exceed the previous stage's 5"),
    (((5, 64, 0),), r"config.rl.length_schedule\[0\].token_budget: must be >= 1, got 0"),
    (((5, 64.5, 32),), r"config.rl.length_schedule\[0\].max_response_len: expected int, got float 64.5"),
    (((5, 64),), r"config.rl.length_schedule\[0\]: expected \(from_iteration, max_response_len, token_budget\)"),
])
def test_bad_schedules_are_named(schedule, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(_config(length_schedule=schedule))


def test_lengths_per_iteration():
  rl = config_lib.from_config_dict(_config(iterations=20, max_response_len=64, token_budget=32,
                                           length_schedule=((5, 128, 48), (10, 256, 64), (30, 512, 64)))).rl
  assert [rl.lengths_at(it) for it in (1, 4, 5, 9, 10, 20)] == [(64, 32)] * 2 + [(128, 48)] * 2 + [(256, 64)] * 2
  assert rl.longest_lengths() == (256, 64)  # the stage from iteration 30 is never reached
  shrinking = config_lib.from_config_dict(_config(max_response_len=64, length_schedule=((2, 32, 32),))).rl
  assert shrinking.longest_lengths()[0] == 64


class _Tokenizer:
  """The model samples ids below its vocab: an eos beyond it never comes, so every length is set by a cap."""
  pad_id, eos_id = 0, 10_000

  def decode(self, ids):
    return " ".join(map(str, ids))


class _NoReward:
  failures, judge_failures, judge_time_s = 0, 0, 0.0  # the counts the loop reports: no verifier, no judges

  def __call__(self, texts, examples):
    return np.zeros(len(texts), np.float32)


def test_the_loop_applies_the_schedule_to_new_and_buffered_rollouts(tmp_path, monkeypatch):
  """Base cap 8 / budget 6; from iteration 2, cap 16 / budget 5; from iteration 4, cap 8. Group ids count the
  prompts in order, 2 per iteration: groups 0-1 start in iteration 1, 2-3 in 2, 4-5 in 3, 6-7 in 4."""
  config = _config(iterations=4, prompts_per_iteration=2, samples_per_prompt=2, minibatches=1, max_response_len=8,
                   token_budget=6, length_schedule=((2, 16, 5), (4, 8, 5)), curriculum=(), prioritized=False,
                   length_penalty_weight=0.0)
  config.sampling.update(backend="model", repeat_ngram=0, num_slots=8, chunk_size=4)
  config.eval.every, config.checkpoint.every = 0, 4
  config = config_lib.from_config_dict(config)

  runs, engines = [], []

  class RecordingEngine(loop.RolloutEngine):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      engines.append(self)

    def run(self, params, requests, replay_buffer, iteration, token_budget, rng):
      finished, stats = super().run(params, requests, replay_buffer, iteration, token_budget, rng)
      runs.append(dict(
          caps={r.max_new_tokens for r in requests}, budget=token_budget,
          finished={(t.prompt_id, len(t.response_tokens), t.finish_reason, tuple(np.unique(t.token_iterations)))
                    for t in finished},
          buffered={(t.prompt_id, len(t.response_tokens)) for t in replay_buffer}))
      return finished, stats

  monkeypatch.setattr(loop, "RolloutEngine", RecordingEngine)
  train = [{"inputs_ids": [3 + i, 40 + i, 90 - i], "answer": "0"} for i in range(8)]
  trainer = main_job.make_trainer(config)
  params = trainer.init_params(jax.random.PRNGKey(0))
  loop.run_rl(config, str(tmp_path), trainer, params, _Tokenizer(), train, [], _NoReward())

  engine, = engines  # built once, for the longest stage
  assert engine.scfg.max_new_tokens == 16 and engine.scfg.max_length >= 3 + 16
  assert [(r["caps"], r["budget"]) for r in runs] == [({8}, 6), ({16}, 5), ({16}, 5), ({8}, 5)]
  # 1: every new sample stops at the budget (6 < 8) and waits in the buffer.
  assert runs[0]["finished"] == set() and runs[0]["buffered"] == {(0, 6), (1, 6)}
  # 2: the cap grew to 16: groups 0-1 continue past the old cap of 8 (6 + 5) and wait again.
  assert runs[1]["finished"] == set() and runs[1]["buffered"] == {(0, 11), (1, 11), (2, 5), (3, 5)}
  # 3: groups 0-1 reach the new cap, 16 tokens over three iterations.
  assert runs[2]["finished"] == {(g, 16, "max_length", (1, 2, 3)) for g in (0, 1)}
  assert runs[2]["buffered"] == {(2, 10), (3, 10), (4, 5), (5, 5)}
  # 4: the cap shrank to 8: groups 2-3, already at 10, finish without a new token; groups 4-5 stop at 8.
  assert runs[3]["finished"] == ({(g, 10, "max_length", (2, 3)) for g in (2, 3)} |
                                 {(g, 8, "max_length", (3, 4)) for g in (4, 5)})
  assert runs[3]["buffered"] == {(6, 5), (7, 5)}
  rows = metrics_lib.read_jsonl(str(tmp_path / "rl.jsonl"))
  assert [(r["max_response_len"], r["token_budget"]) for r in rows] == [(8, 6), (16, 5), (16, 5), (8, 5)]
  assert [r["finish_max_length"] for r in rows] == [0, 0, 4, 8]


def test_plan_takes_the_longest_stage():
  """experiments.plan's worst case under a schedule is that of a run at its longest stage throughout."""
  from experiments import plan  # pylint: disable=g-import-not-at-top
  scheduled = config_lib.from_config_dict(_config(iterations=3, max_response_len=64, token_budget=32,
                                                  length_schedule=((2, 256, 64), (3, 128, 64))))
  longest = config_lib.from_config_dict(_config(iterations=3, max_response_len=256, token_budget=64))
  assert plan.lengths(scheduled) == plan.lengths(longest) and plan.lengths(longest)["response"] == 256
  assert plan.iteration_flops(scheduled, plan.lengths(scheduled)) == plan.iteration_flops(longest,
                                                                                         plan.lengths(longest))
