"""Does RL on the main job's task transfer? RL on a FIXED set of training prompts, then held-out accuracy.

  python -m experiments.analysis.rl_transfer --workdir=/tmp/k15_arith [--iterations=12 --learning_rate=1e-4]

Starts from the main job's warm-up (WORKDIR/warmup, WORKDIR/data), runs the k1.5 loop's pieces (rollout engine,
build_batch, reference log-probs, minibatch steps; Adam without reset) on the same --prompts training prompts every
iteration, and prints per iteration: T=1 accuracy of the samples on those prompts and the largest difference between
the sampler's log-probs and the trainer's recomputed ones; at the end, held-out accuracy (greedy and T=1) before and
after. Rising train-prompt accuracy with flat or falling held-out accuracy means the updates are prompt-specific.
"""
import dataclasses
import os

import jax
import numpy as np
from absl import app, flags

from experiments import train as main_job
from experiments.configs import arith
from k15 import config as config_lib
from k15 import models
from k15.rl import evaluation, loop, rollout
from k15.sampling import Request, RolloutEngine

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished main-job workdir (data/ and warmup/).")
_ITERATIONS = flags.DEFINE_integer("iterations", 12, "RL iterations on the fixed prompts.")
_PROMPTS = flags.DEFINE_integer("prompts", 32, "Fixed training prompts.")
_LR = flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate (no reset between iterations).")
flags.mark_flag_as_required("workdir")


def held_out(trainer, params, tokenizer, eval_, config, verifier):
  return {t: evaluation.evaluate_at(trainer, params, tokenizer, eval_, config.sampling, verifier, temperature=t,
                                    max_new_tokens=config.eval.max_response_len)["accuracy"] for t in (0.0, 1.0)}


def main(_):
  config = config_lib.from_config_dict(arith.get_config(""))
  config = dataclasses.replace(config, rl=dataclasses.replace(config.rl, learning_rate=_LR.value,
                                                              reset_optimizer=False))
  model_cfg = config.model
  trainer = main_job.make_trainer(config)
  tokenizer, train, eval_ = main_job.load_task(config, _WORKDIR.value, write=False)
  _, params = models.load_hf(os.path.join(_WORKDIR.value, "warmup"))
  params = trainer.place_params(params)
  verifier = main_job.make_verifier(config)
  before = held_out(trainer, params, tokenizer, eval_, config, verifier)

  rl, G = config.rl, config.rl.samples_per_prompt
  seq_len = 8 * -(-(max(len(e["inputs_ids"]) for e in train) + rl.max_response_len) // 8)
  scfg = rollout.sampling_config(config.sampling, eos_id=tokenizer.eos_id, max_length=seq_len,
                                 max_new_tokens=rl.max_response_len, temperature=config.sampling.temperature)
  engine = RolloutEngine(model_cfg, scfg, config.sampling.num_slots, trainer.mesh)
  optimizer = loop.rl_optimizer(rl)
  step_fn = trainer.make_step(loop.make_loss_fn(model_cfg, rl), optimizer)
  ref_fn = trainer.make_eval(lambda p, b: models.token_logprobs(model_cfg, p, b["tokens"]))
  opt_state = trainer.init_opt_state(optimizer, params)
  rng = np.random.default_rng(config.seed)
  prompts = rng.choice(len(train), _PROMPTS.value, replace=False)
  for it in range(_ITERATIONS.value):
    requests = [Request(i, train[p]["inputs_ids"], num_samples=G) for i, p in enumerate(prompts)]
    with trainer.context():
      finished, _ = engine.run(params, requests, None, it, None, jax.random.PRNGKey(it))
    groups = [sorted([t for t in finished if t.prompt_id == g], key=lambda t: t.sample_index)
              for g in range(len(prompts))]
    batch, correct, _ = loop.build_batch(groups, [train[p] for p in prompts], tokenizer, verifier, 0.0, rl)
    batch["ref_logp"] = np.asarray(ref_fn(params, {"tokens": batch["tokens"]}))
    gap = max(np.abs(batch["ref_logp"][b, len(t.prompt_tokens) - 1:][:len(t.logprobs)] - t.logprobs).max()
              for b, t in enumerate(t for g in groups for t in g))
    for mb in loop.iter_minibatches(batch, len(groups), rl.minibatches, G, rng):
      params, opt_state, _ = step_fn(params, opt_state, mb)
    print(f"iteration {it + 1}: train-prompt accuracy (T=1) {correct.mean():.3f}, "
          f"sampler vs trainer log-prob gap {gap:.1e}", flush=True)
  after = held_out(trainer, params, tokenizer, eval_, config, verifier)
  for t in (0.0, 1.0):
    print(f"held-out accuracy at T={t:g}: {before[t]:.1%} -> {after[t]:.1%}")


if __name__ == "__main__":
  app.run(main)
