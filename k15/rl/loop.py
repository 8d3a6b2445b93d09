"""The k1.5 iteration (RECIPE.md section 7): rollout -> rewards -> several minibatch steps -> next iteration.

Groups and partial rollouts: each chosen prompt starts a group of k samples in one iteration. A sample that
reaches the iteration's token budget waits in the replay buffer and is resumed in a later iteration with the
then-current params; samples that finish wait in `pending` until their whole group has finished, so every
group's baseline and length penalty see all k responses. A group trains in the iteration its last member
finishes; the reference is the policy at the start of that iteration (its log-probs are recomputed over the
whole response), and by default only each response's newest segment carries loss.

The length schedule (`RLConfig.lengths_at`) gives each iteration its response cap and token budget. The cap holds
for every trajectory the iteration samples, buffered partials included: a partial continues up to a grown cap, and
one already at or beyond a shrunk cap finishes with "max_length" without new tokens. The rollout engine is built
once, for the schedule's longest responses.

On several processes, each iteration compares the host-side state of all processes (k15.rl.agreement) before it
trains, and a preemption notice (k15.preemption) stops the run after an iteration whose checkpoint is saved.
"""
import time

import jax
import numpy as np
import optax

from k15 import models, preemption, storage
from k15.checkpoint import Checkpointer
from k15.config import Config, RLConfig
from k15.rewards import penalties
from k15.rl import agreement, batching, evaluation, losses, rollout
from k15.rl.metrics import MetricsLogger
from k15.rl.prompt_sampler import PromptSampler
from k15.rl.trainer import DivergenceError, in_chunks
from k15.sampling import ReplayBuffer, Request, RolloutEngine


def rl_optimizer(rl: RLConfig):
  """The optimizer of the training phase: gradient clipping, then rl.optimizer."""
  kinds = {
      "adam": lambda: optax.adam(rl.learning_rate, eps=rl.adam_eps),
      "sgd": lambda: optax.sgd(rl.learning_rate),
      "momentum": lambda: optax.sgd(rl.learning_rate, momentum=0.9),
  }
  return optax.chain(optax.clip_by_global_norm(rl.max_grad_norm), kinds[rl.optimizer]())


def make_loss_fn(model_cfg, rl: RLConfig):
  """loss_fn(params, batch) for the configured policy loss (batch rows padded with weight-0 groups)."""
  options = dict(tau=rl.tau, log_ratio=rl.log_ratio, baseline=rl.baseline, form=rl.form) if rl.loss == "k15" else {}
  loss = losses.get_policy_loss(rl.loss)

  def loss_fn(params, batch):
    if "packed_tokens" in batch:  # the samples' log-probs from their packed rows
      packed_logp = models.token_logprobs(model_cfg, params, batch["packed_tokens"], batch["packed_segments"])
      logp = packed_logp[batch["unpack_rows_BxTm1"], batch["unpack_cols_BxTm1"]]
    else:
      logp = models.token_logprobs(model_cfg, params, batch["tokens"])
    return loss(logp, batch["ref_logp"], batch["mask"], batch["rewards"], rl.samples_per_prompt,
                sample_weights_B=batch["weights"], **options)
  return loss_fn


def pack_minibatch(mb, pad_id: int):
  """The minibatch with its samples packed into as few rows as a size class allows (B/8, B/4, B/2 or B rows of the
  same length: few compiled shapes), and the padding share of the packed rows."""
  B, T = mb["tokens"].shape
  lengths = mb["lengths"]
  _, _, needed = batching.pack_rows(lengths, T)
  rows = next(r for r in (B // 8, B // 4, B // 2, B) if r >= needed)
  return dict(mb, **batching.packed(mb["tokens"], lengths, rows, pad_id)), 1 - lengths.sum() / (rows * T)


class RLState:
  """Host-side state that a checkpoint must carry besides params: everything needed to resume exactly."""

  def __init__(self, prompt_sampler, seed):
    self.iteration = 0
    self.buffer = ReplayBuffer()
    self.pending = {}  # group id -> finished trajectories (as buffer records) of a group not yet complete
    self.group_prompt = {}  # group id -> index of its prompt in the train set
    self.next_group = 0
    self.sampler = prompt_sampler
    self.rng = np.random.default_rng(seed)
    self.bad_steps = 0  # training steps the divergence guard skipped, over the run

  def state_dict(self):
    return {
        "iteration": self.iteration,
        "buffer": self.buffer.state_dict(),
        "pending": {str(g): [rollout.trajectory_to_dict(t) for t in ts] for g, ts in self.pending.items()},
        "group_prompt": {str(g): p for g, p in self.group_prompt.items()},
        "next_group": self.next_group,
        "sampler": self.sampler.state_dict(),
        "rng": self.rng.bit_generator.state,
        "bad_steps": self.bad_steps,
    }

  def load_state_dict(self, d):
    self.iteration = int(d["iteration"])
    self.buffer = ReplayBuffer.from_state_dict(d["buffer"])
    self.pending = {int(g): [rollout.trajectory_from_dict(t) for t in ts] for g, ts in d["pending"].items()}
    self.group_prompt = {int(g): int(p) for g, p in d["group_prompt"].items()}
    self.next_group = int(d["next_group"])
    self.sampler.load_state_dict(d["sampler"])
    self.rng.bit_generator.state = _plain(d["rng"])
    self.bad_steps = int(d["bad_steps"])


def _plain(x):
  """JSON round trip turns ints into numpy arrays in places; bit generator state wants Python ints."""
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def make_prompt_sampler(rl: RLConfig, train, seed: int) -> PromptSampler:
  """The curriculum's stages and prioritization over the training examples (their difficulty labels)."""
  labels = [ex.get("difficulty") for ex in train]
  difficulties = None if any(d is None for d in labels) else np.array(labels)  # unlabelled: no curriculum
  return PromptSampler(len(train), difficulties=difficulties, stages=rl.curriculum, prioritized=rl.prioritized,
                       floor=rl.priority_floor, ema_decay=rl.priority_ema, seed=seed)


def build_batch(groups, examples, tokenizer, verifier, length_weight, rl_cfg):
  """Rewards and fixed-shape arrays for complete groups; returns (batch, correct_PxG, metrics).

  The sequence length is the batch's longest prompt + response rounded up to a multiple of 32: a few
  compiled shapes, and no step pays for the maximum response length when responses are short.
  """
  G = rl_cfg.samples_per_prompt
  trajs = [t for g in groups for t in g]
  texts = [tokenizer.decode(t.response_tokens) for t in trajs]
  judge_time = verifier.judge_time_s  # the judges' time so far: rm_time_s is this batch's
  correct = verifier(texts, [ex for ex in examples for _ in range(G)]).reshape(-1, G)
  lengths = np.array([len(t.response_tokens) for t in trajs], np.float32).reshape(-1, G)
  reasons = np.array([t.finish_reason for t in trajs], dtype=object).reshape(-1, G)
  rewards, length_term, _ = penalties.total_rewards(correct, lengths, reasons, length_weight=length_weight,
                                                    repeat_penalty_value=rl_cfg.repeat_penalty)
  loss_from = [rollout.newest_segment_start(t) if rl_cfg.mask_old_segments else 0 for t in trajs]
  seq_len = 32 * -(-max(len(t.prompt_tokens) + len(t.response_tokens) for t in trajs) // 32)
  tokens, mask = batching.pack([t.prompt_tokens for t in trajs], [t.response_tokens for t in trajs], seq_len,
                               tokenizer.pad_id, loss_from)
  batch = {"tokens": tokens, "mask": mask, "rewards": rewards.reshape(-1), "weights": np.ones(len(trajs), np.float32),
           "lengths": np.array([len(t.prompt_tokens) + len(t.response_tokens) for t in trajs], np.int32)}
  metrics = {
      "accuracy": correct.mean(),
      "verifier_failures": verifier.failures,  # responses scored 0 because their verifier failed, so far
      "rm_time_s": verifier.judge_time_s - judge_time,  # reward models' scoring (rl.reward)
      "rm_failures": verifier.judge_failures,  # responses judged 0 for want of a verdict, so far
      "reward": rewards.mean(),
      "length_penalty_weight": length_weight,
      "length_penalty_share": np.abs(length_term).sum() / max(np.abs(rewards).sum(), 1e-9),
      "response_len_mean": lengths.mean(),
      "response_len_max": lengths.max(),
      "groups_trained": len(groups),
      "trained_tokens": mask.sum(),
  }
  return batch, correct, metrics


def _pad_groups(batch, n_groups, G):
  """Pads to n_groups whole groups with weight-0 rows (mask 0), so minibatch shapes come from few sizes."""
  B = n_groups * G
  out = {}
  for k, v in batch.items():
    pad = np.zeros((B - v.shape[0],) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


def _minibatch_rows(n_groups, minibatches, G):
  per = -(-n_groups // minibatches)
  return 4 * -(-per // 4) * G  # whole groups, padded to a multiple of 4: few shapes, little waste


def iter_minibatches(batch, n_groups, minibatches, G, rng):
  """The iteration's batch split into `minibatches` parts of whole groups in a random order, each padded to one
  shape (_minibatch_rows)."""
  order = rng.permutation(n_groups)
  per = -(-n_groups // minibatches)
  size = _minibatch_rows(n_groups, minibatches, G) // G
  for m in range(minibatches):
    gids = order[m * per:(m + 1) * per]
    if len(gids) == 0:
      continue
    rows = (gids[:, None] * G + np.arange(G)).reshape(-1)
    yield _pad_groups({k: v[rows] for k, v in batch.items()}, size, G)


def rl_iteration(config: Config, state: RLState, trainer, engine, step_fn, ref_fn, optimizer, params, opt_state,
                 tokenizer, train, verifier):
  """Iteration state.iteration's rollouts, rewards and minibatch steps; returns (params, opt_state, metrics, skipped),
  skipped: the training steps the divergence guard skipped. Evaluation, logging and checkpoints are run_rl's."""
  rl = config.rl
  G = rl.samples_per_prompt
  it = state.iteration
  t0 = time.time()
  # The length schedule: this iteration's response cap holds for every trajectory it samples, resumed ones
  # included.
  max_response_len, token_budget = rl.lengths_at(it)
  for traj in state.buffer:
    traj.max_new_tokens = max_response_len
  # 1. prompts: the curriculum picks the pool, prioritization picks within it.
  requests = []
  for prompt_index in state.sampler.sample(rl.prompts_per_iteration, it):
    gid = state.next_group
    state.next_group += 1
    state.group_prompt[gid] = int(prompt_index)
    requests.append(Request(gid, train[prompt_index]["inputs_ids"], num_samples=G, max_new_tokens=max_response_len))

  # 2. rollouts: buffered partials first, then the new requests; budget-cut samples go back to the buffer
  # (without partial rollouts every sample runs to its end in this iteration).
  with trainer.context():
    finished, stats = engine.run(params, requests, state.buffer, it, token_budget if rl.partial_rollouts else None,
                                 jax.random.PRNGKey(int(state.rng.integers(2**31))))
  engine.release()  # the rollout cache is not held through training and evaluation
  t_rollout = time.time() - t0
  for t in finished:
    state.pending.setdefault(t.prompt_id, []).append(t)
  complete = sorted(g for g, ts in state.pending.items() if len(ts) == G)
  groups = [sorted(state.pending.pop(g), key=lambda t: t.sample_index) for g in complete]
  prompt_of = [state.group_prompt.pop(g) for g in complete]

  metrics = {"iteration_time_s": 0.0, "max_response_len": max_response_len, "token_budget": token_budget,
             "rollout_time_s": t_rollout, "slot_utilization": stats.slot_utilization,
             "decode_steps": stats.decode_steps, "useful_tokens": stats.useful_tokens,
             "resumed": stats.resumed, "to_buffer": stats.to_buffer,
             "buffered": len(state.buffer), "pending_groups": len(state.pending)}
  for reason in ("eos", "repeat", "max_length"):
    metrics[f"finish_{reason}"] = sum(t.finish_reason == reason for t in finished)
  skipped = 0  # training steps of this iteration the divergence guard skipped
  batch = None
  if groups:
    # 3. rewards: verifier + length penalty (after its warm-up) + repeat penalty.
    weight = penalties.length_penalty_weight(it, rl.length_penalty_warmup, rl.length_penalty_weight)
    batch, correct, batch_metrics = build_batch(groups, [train[p] for p in prompt_of], tokenizer, verifier, weight, rl)
    metrics.update(batch_metrics)
    state.sampler.update(np.asarray(prompt_of), correct.mean(axis=1))
  # Every process must hold the same host-side state from here on, or the next dispatches differ and hang.
  agreement.check(it, {"prompts": [r.prompt_tokens for r in requests], "rewards": None if batch is None else
                       batch["rewards"], "replay buffer": state.buffer.state_dict(), "pending": state.pending,
                       "sampler statistics": state.sampler.state_dict(), "rng": state.rng.bit_generator.state})
  if groups:
    # 4. reference = this iteration's starting policy; fresh optimizer state; several minibatch steps.
    rows = _minibatch_rows(len(groups), rl.minibatches, G)
    batch["ref_logp"] = in_chunks(ref_fn, params, {"tokens": batch["tokens"]}, rows)
    if rl.reset_optimizer:
      opt_state = trainer.init_opt_state(optimizer, params)
    step_metrics, padding = [], []
    for mb in iter_minibatches(batch, len(groups), rl.minibatches, G, state.rng):
      if rl.pack:
        mb, share = pack_minibatch(mb, tokenizer.pad_id)
        padding.append(share)
      params, opt_state, m = step_fn(params, opt_state, mb)
      step_metrics.append(jax.device_get(m))
    if padding:
      metrics["pack_padding"] = float(np.mean(padding))
    metrics.update({f"loss/{k}": np.mean([m[k] for m in step_metrics]) for k in step_metrics[0]})
    skipped = int(sum(m["skipped"] for m in step_metrics))
  metrics["iteration_time_s"] = time.time() - t0
  metrics["rm_time_share"] = metrics.get("rm_time_s", 0.0) / max(metrics["iteration_time_s"], 1e-9)
  metrics["tokens_per_s"] = stats.useful_tokens / max(t_rollout, 1e-9)
  return params, opt_state, metrics, skipped


def run_rl(config: Config, workdir, trainer, params, tokenizer, train, eval_, verifier, eval_verifier=None):
  """Runs config.rl.iterations iterations from params (or from the latest checkpoint); returns the params.

  train / eval_: example dicts (inputs_ids, answer, difficulty, and optionally domain and test_cases);
  verifier: a k15.rewards.verifiers.Verifier, the training reward (config.rl.reward); eval_verifier: the held-out
  evaluation's (default: verifier), e.g. the rules when a reward model scores training. Evaluates on eval_ every
  config.eval.every iterations.
  """
  eval_verifier = verifier if eval_verifier is None else eval_verifier
  rl = config.rl
  model_cfg = trainer.cfg
  max_prompt = max(len(ex["inputs_ids"]) for ex in train)
  longest_response = rl.longest_lengths()[0]  # one engine, its cache sized for the length schedule's longest stage
  seq_len = 8 * -(-(max_prompt + longest_response) // 8)
  state = RLState(make_prompt_sampler(rl, train, config.seed), config.seed)
  optimizer = rl_optimizer(rl)
  step_fn = trainer.make_step(make_loss_fn(model_cfg, rl), optimizer)
  ref_fn = trainer.make_eval(lambda p, batch: models.token_logprobs(model_cfg, p, batch["tokens"]))
  scfg = rollout.sampling_config(config.sampling, eos_id=tokenizer.eos_id, max_length=seq_len,
                                 max_new_tokens=longest_response, temperature=config.sampling.temperature)
  engine = RolloutEngine(model_cfg, scfg, config.sampling.num_slots, trainer.mesh, trainer.sampling_rules,
                         rollout.sampling_backend(config.sampling, model_cfg, trainer.mesh))
  opt_state = trainer.init_opt_state(optimizer, params)

  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
  restored = ckpt.restore_latest((params, opt_state))  # a corrupt newest checkpoint falls back to the one before
  if restored is not None:
    _, (params, opt_state), host = restored
    state.load_state_dict(host)
    print(f"resumed RL from iteration {state.iteration}", flush=True)
  logger = MetricsLogger(workdir, "rl", total_steps=rl.iterations, start_step=state.iteration)

  with preemption.PreemptionWatch() as watch:  # stops after an iteration once SIGTERM arrives
    while state.iteration < rl.iterations:
      state.iteration += 1
      it = state.iteration
      params, opt_state, metrics, skipped = rl_iteration(config, state, trainer, engine, step_fn, ref_fn, optimizer,
                                                         params, opt_state, tokenizer, train, verifier)
      if config.eval.every and (it % config.eval.every == 0 or it == rl.iterations):
        ev = evaluation.evaluate(trainer, params, tokenizer, eval_, config.sampling, config.eval, eval_verifier)
        metrics.update(eval_accuracy=ev["accuracy"], eval_mean_tokens=ev["mean_tokens"])
      logger.write(it, metrics, show=("accuracy", "eval_accuracy", "response_len_mean", "reward",
                                      "slot_utilization", "tokens_per_s"))
      if skipped:
        state.bad_steps += skipped
        print(f"WARNING: iteration {it}: {skipped} training steps had a non-finite loss, gradient or update and were "
              f"skipped ({state.bad_steps} in the run, rl.max_bad_steps={rl.max_bad_steps}); not checkpointed",
              flush=True)
        if state.bad_steps > rl.max_bad_steps:
          raise DivergenceError(
              f"RL diverged at iteration {it}: {state.bad_steps} training steps had a non-finite loss, gradient or "
              f"update (more than rl.max_bad_steps={rl.max_bad_steps}); none was applied, and no checkpoint was "
              f"saved since. Checkpoints kept: {ckpt.all_steps() or 'none'}. Lower rl.learning_rate and resume.")
      preempted = watch.reached(it)  # every process, every iteration: they agree on the iteration to stop after
      if not skipped and (preempted or it % config.checkpoint.every == 0 or it == rl.iterations):
        ckpt.save(it, (params, opt_state), state.state_dict(), eval_accuracy=metrics.get("eval_accuracy"))
      if preempted:
        logger.close()
        ckpt.close()
        raise preemption.Preempted(f"preempted: stopped after RL iteration {it}; checkpoints {ckpt.all_steps()} in "
                                   f"{ckpt.directory}. Rerun the same command to resume.")
  logger.close()
  ckpt.close()
  return params
