"""The long2short pipeline end to end at smoke size, on a tiny main-job workdir built here.

The main-job workdir has the layout experiments.train leaves (data/, warmup/, final/) with a randomly initialized
final/ model: test_main_job covers the main job itself, and a smoke-trained model answers no better than a random
one. So that DPO and rejection sampling train on real pairs anyway, their sampled groups are written to the
pipeline's sample cache (samples/<variant>.json) from the task's own traces: per prompt the long trace, the short
trace, a long trace with a wrong answer and a bare wrong answer.
"""
import csv
import json
import os
import types

import jax
import numpy as np
import pytest

from experiments import long2short as l2s
from experiments.configs import arith as arith_config
from k15 import config as config_lib
from k15 import models
from k15.data import arith
from k15.long2short import dpo, rejection
from k15.rewards.arith import arith_reward
from k15.rewards.math import extract_answer
from k15.rl import batching
from k15.rl import metrics as metrics_lib

_SEQ_LOGP = jax.jit(dpo.sequence_logp, static_argnums=0)
VARIANTS = ("long", "short", "merge", "merge_rs", "dpo", "rl_long")


def _config(variants=VARIANTS):
  c = arith_config.get_config("smoke")
  c.long2short.variants = variants
  c.eval.max_response_len = 48  # a random model rambles; every variant is still evaluated alike
  return config_lib.from_config_dict(c)


def _main_workdir(path):
  c = _config()
  arith.prepare_arith_data(os.path.join(path, "data"), c.data.n_train, c.data.n_eval, c.seed, c.data.levels,
                           c.data.tokenizer_vocab_size)
  params = models.init_params(c.model, jax.random.PRNGKey(0))
  for name in ("warmup", "final"):
    models.save_hf(os.path.join(path, name), c.model, params)


def _write_samples(p, variant, seed):
  """The sample cache of `variant` for the pipeline's sample prompts, built from the task's traces."""
  by_id = {ex["id"]: ex for ex in arith.read_jsonl(os.path.join(p.main, "data", "train.jsonl"))}
  examples = p.sample_prompts()
  enc = p.tokenizer.encode
  responses = []
  for ex in examples:
    raw = by_id[ex["id"]]
    wrong = str((int(raw["answer"]) + 1) % 10)
    long_wrong = raw["cot_long"].rsplit("Answer:", 1)[0] + f"Answer: {wrong}"
    responses.append([enc(raw["cot_long"]), enc(raw["cot_short"]), enc(long_wrong), enc(f"Answer: {wrong}")])
  assert p.l.samples_per_prompt == 4
  lengths = [[len(r) for r in group] for group in responses]
  correct = [[arith_reward(p.tokenizer.decode(r), ex["answer"]) for r in group]
             for ex, group in zip(examples, responses)]
  assert all(c == [1.0, 1.0, 0.0, 0.0] for c in correct)  # the verifier agrees with how they were built
  os.makedirs(os.path.join(p.workdir, "samples"), exist_ok=True)
  with open(os.path.join(p.workdir, "samples", f"{variant}.json"), "w") as f:
    json.dump({"ids": [ex["id"] for ex in examples], "n": p.l.samples_per_prompt, "max_len": p.l.sample_max_len,
               "seed": seed, "responses": responses, "lengths": lengths, "correct": correct}, f)
  return examples, responses, np.array(lengths), np.array(correct)


def _seq_logp(p, params, prompts, responses):
  tokens, mask = batching.pack(prompts, responses, max(len(a) + len(b) for a, b in zip(prompts, responses)),
                               p.tokenizer.pad_id)
  return np.asarray(_SEQ_LOGP(p.cfg, params, tokens, mask))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  main = str(tmp_path_factory.mktemp("main"))
  _main_workdir(main)
  workdir = str(tmp_path_factory.mktemp("l2s"))
  # First the variants the cached samples come from, then everything (those three are skipped).
  l2s.Long2Short(_config(("long", "short", "merge")), workdir, main).run()
  p = l2s.Long2Short(_config(), workdir, main)
  samples = {v: _write_samples(p, v, p.config.seed + l2s.SAMPLE_SEED_OFFSET[v]) for v in ("long", "merge")}
  summary = p.run()
  return p, samples, summary


def test_every_variant_is_written_and_tabled(run):
  p, _, summary = run
  w = p.workdir
  for name in ("long2short.md", "long2short.csv", "long2short.png", "summary.json", "source.json",
               "rl_long/rl.jsonl", "rl_long/rl_curves.png"):
    assert os.path.exists(os.path.join(w, name)), name
  for v in VARIANTS:
    assert os.path.exists(os.path.join(w, "models", v, "model.safetensors")), v
  with open(os.path.join(w, "long2short.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == list(VARIANTS)
  for r in rows:
    with open(os.path.join(w, "eval", f"{r['variant']}.json")) as f:
      ev = json.load(f)
    assert float(r["accuracy"]) == pytest.approx(ev["accuracy"], rel=1e-5)
    assert float(r["mean_tokens"]) == pytest.approx(ev["mean_tokens"], rel=1e-5)
    assert float(r["token_change"]) == pytest.approx(ev["mean_tokens"] / summary["results"]["long"]["mean_tokens"]
                                                     - 1, rel=1e-4, abs=1e-6)
  with open(os.path.join(w, "long2short.md")) as f:
    table = f.read()
  assert all(f"| {v} (" in table for v in VARIANTS)
  assert summary["trained_on"] == {"merge_rs": "16 SFT examples", "dpo": "32 pairs"}


def test_long_is_the_main_model_and_merge_its_average(run):
  p, _, _ = run
  _, final = models.load_hf(os.path.join(p.main, "final"))
  _, long_ = models.load_hf(p.model_dir("long"))
  _, short = models.load_hf(p.model_dir("short"))
  _, merged = models.load_hf(p.model_dir("merge"))
  for f, lo, s, m in zip(*(jax.tree.leaves(t) for t in (final, long_, short, merged))):
    np.testing.assert_array_equal(lo, f)
    np.testing.assert_allclose(m, 0.5 * np.asarray(lo) + 0.5 * np.asarray(s), rtol=1e-6, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(long_), jax.tree.leaves(short)))


def test_dpo_prefers_the_shortest_correct(run):
  p, samples, _ = run
  examples, responses, lengths, correct = samples["long"]
  prompts, chosen, rejected = [], [], []
  for ex, group, len_G, cor_G in zip(examples, responses, lengths, correct):
    pairs = dpo.build_dpo_pairs(len_G, cor_G)
    assert pairs == [(1, 0), (1, 2)]  # short over long (>= 1.5x) and over the long wrong one; not the bare wrong
    for c, r in pairs:
      prompts.append(ex["inputs_ids"])
      chosen.append(group[c] + [p.tokenizer.eos_id])
      rejected.append(group[r] + [p.tokenizer.eos_id])
  ref, new = p.load_variant("long"), p.load_variant("dpo")
  margin = ((_seq_logp(p, new, prompts, chosen) - _seq_logp(p, ref, prompts, chosen))
            - (_seq_logp(p, new, prompts, rejected) - _seq_logp(p, ref, prompts, rejected)))
  assert margin.mean() > 0 and (margin > 0).mean() > 0.9, margin


def test_merge_rs_learned_the_shortest_correct(run):
  p, samples, _ = run
  examples, responses, lengths, correct = samples["merge"]
  prompts, targets = rejection.rejection_sft_set(examples, responses, lengths, correct, p.tokenizer.eos_id)
  assert [t[:-1] for t in targets] == [group[1] for group in responses]  # the short trace of every prompt
  before = _seq_logp(p, p.load_variant("merge"), prompts, targets)
  after = _seq_logp(p, p.load_variant("merge_rs"), prompts, targets)
  assert after.mean() > before.mean() + 1.0, (before.mean(), after.mean())


def test_long2short_rl_settings(run):
  p, _, _ = run
  rows = metrics_lib.read_jsonl(os.path.join(p.workdir, "rl_long", "rl.jsonl"))
  rl = p.config.long2short.rl
  assert [r["step"] for r in rows] == list(range(1, rl.iterations + 1))
  trained = [r for r in rows if r.get("groups_trained")]
  assert trained and all(r["length_penalty_weight"] == rl.length_penalty_weight for r in trained)  # from the start
  assert all(r["response_len_max"] <= rl.max_response_len for r in trained)


def test_rerun_skips_every_stage(run, capsys):
  p, _, summary = run
  files = [os.path.join(p.model_dir(v), "model.safetensors") for v in VARIANTS]
  mtimes = [os.path.getmtime(f) for f in files]
  again = p.run()
  out = capsys.readouterr().out
  assert out.count("model found, skipped") == len(VARIANTS)
  assert [os.path.getmtime(f) for f in files] == mtimes
  assert again["rows"] == summary["rows"]


def test_workdir_of_another_long_model_is_refused(run, tmp_path):
  p, _, _ = run
  with open(os.path.join(p.workdir, "source.json")) as f:
    source = json.load(f)
  bad = str(tmp_path / "l2s")
  os.makedirs(bad)
  with open(os.path.join(bad, "source.json"), "w") as f:
    json.dump(dict(source, final_weights_sha256="0" * 64), f)
  with pytest.raises(ValueError, match="built from another long model"):
    l2s.Long2Short(p.config, bad, p.main)
  with pytest.raises(FileNotFoundError, match=r"missing \['final/config.json', 'data/train.jsonl'"):
    l2s.Long2Short(_config(), str(tmp_path / "out"), str(tmp_path / "nothing"))


def test_long_model_from_another_directory(run, tmp_path):
  """long_dir: the long model need not be the main job's final/ (the seeds runner passes an RL variant's)."""
  p, _, _ = run
  other = str(tmp_path / "other_long")
  params = models.init_params(p.cfg, jax.random.PRNGKey(7))
  models.save_hf(other, p.cfg, params)
  q = l2s.Long2Short(_config(("long",)), str(tmp_path / "l2s"), p.main, long_dir=other)
  q.run()
  with open(os.path.join(q.workdir, "source.json")) as f:
    assert json.load(f)["long_model"] == other
  _, long_ = models.load_hf(q.model_dir("long"))
  for a, b in zip(jax.tree.leaves(long_), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match=r"missing \['../nowhere/config.json'\]"):
    l2s.Long2Short(_config(("long",)), str(tmp_path / "l2s"), p.main, long_dir=os.path.join(p.main, "..", "nowhere"))


def test_long2short_on_math_prompts_scores_with_math_verify(math_main_job, tmp_path, monkeypatch):
  """Long2short on the math main job (prompt-file fixtures): the sampled responses are scored by math-verify.

  A random model answers nothing right, so rejection sampling draws its responses from crafted texts per prompt:
  the reference's answer boxed (short), the same after a long preamble, a long wrong answer and a bare "0".
  """
  main, config, _ = math_main_job
  p = l2s.Long2Short(config, str(tmp_path / "l2s"), main)
  answer_of = {tuple(ex["inputs_ids"]): extract_answer(ex["answer"]) for ex in p.train}
  preamble = "We compute every quantity of the question carefully, one step after the other, and check it. "

  def crafted(trainer, params, prompts, tokenizer, rollout_cfg, *, temperature, max_new_tokens, seed):
    del trainer, params, rollout_cfg, temperature, max_new_tokens, seed
    n = config.long2short.samples_per_prompt
    texts = lambda a: [f"\\boxed{{{a}}}", f"{preamble}\\boxed{{{a}}}", f"{preamble}\\boxed{{1000003}}", "0"]
    return [tokenizer.encode(texts(answer_of[tuple(prompt)])[j % n]) for j, prompt in enumerate(prompts)]

  monkeypatch.setattr(rejection, "rollout", types.SimpleNamespace(generate_responses=crafted))
  summary = p.run()
  with open(os.path.join(p.workdir, "samples", "long.json")) as f:
    samples = json.load(f)
  assert samples["correct"] == [[1, 1, 0, 0]] * config.long2short.sample_prompts  # math-verify's verdicts
  assert summary["trained_on"]["dpo"] == f"{2 * config.long2short.sample_prompts} pairs"  # over the long ones
  assert [r["variant"] for r in summary["rows"]] == ["long", "dpo", "rl_long"]
  rows = metrics_lib.read_jsonl(os.path.join(p.workdir, "rl_long", "rl.jsonl"))
  trained = [r for r in rows if r.get("groups_trained")]  # groups finish once their partials do
  assert [r["step"] for r in rows] == [1, 2] and trained and all(r["length_penalty_weight"] == 0.5 for r in trained)
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in summary["results"].values())
