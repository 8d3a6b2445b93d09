"""Long2short building blocks against hand-worked numbers: merging, DPO pairs and loss, shortest rejection
sampling, DPO training, the report and the config checks."""
import csv
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import arith as arith_config
from k15 import config as config_lib
from k15 import models, sharding
from k15.config import DPOConfig
from k15.long2short import dpo, merge, rejection, report
from k15.rl import batching, losses
from k15.rl import metrics as metrics_lib
from k15.rl.metrics import MetricsLogger
from k15.rl.trainer import Trainer


def _tree(x, y):
  return {"layer": {"w": jnp.asarray(x, jnp.float32)}, "b": jnp.asarray(y, jnp.float32)}


def test_merge_by_hand():
  a, b = _tree([[1.0, 2.0], [3.0, 4.0]], [10.0]), _tree([[3.0, 0.0], [1.0, -4.0]], [0.0])
  half = merge.merge_params(a, b)
  np.testing.assert_allclose(half["layer"]["w"], [[2.0, 1.0], [2.0, 0.0]])
  np.testing.assert_allclose(half["b"], [5.0])
  m = merge.merge_params(a, b, (0.3, 0.7))
  # 0.3*1 + 0.7*3 = 2.4, 0.3*2 = 0.6, 0.3*3 + 0.7*1 = 1.6, 0.3*4 - 0.7*4 = -1.6; 0.3*10 = 3.
  np.testing.assert_allclose(m["layer"]["w"], [[2.4, 0.6], [1.6, -1.6]], rtol=1e-6)
  np.testing.assert_allclose(m["b"], [3.0], rtol=1e-6)


def test_merge_keeps_bfloat16():
  a = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
  b = {"w": jnp.asarray([2.0, 4.0], jnp.bfloat16)}
  out = merge.merge_params(a, b)
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [1.5, 3.0])


def test_merge_errors_name_the_leaf():
  a = _tree([[1.0, 2.0]], [1.0])
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*float32\[1, 2\].*float32\[2, 1\]"):
    merge.merge_params(a, _tree([[1.0], [2.0]], [1.0]))
  with pytest.raises(ValueError, match=r"\['b'\].*bfloat16"):
    merge.merge_params(a, {"layer": a["layer"], "b": a["b"].astype(jnp.bfloat16)})
  with pytest.raises(ValueError, match=r"only in a: \['b'\]; only in b: none"):
    merge.merge_params(a, {"layer": a["layer"]})
  with pytest.raises(ValueError, match="sum to 1"):
    merge.merge_params(a, a, (0.5, 0.6))


def test_dpo_pairs_cover_every_rule():
  #           0    1    2    3    4    5    6    7    8
  lengths = [120, 100, 100, 150, 140, 90, 100, 101, 300]
  correct = [1,   1,   1,   1,   1,   0,  0,   0,   0]
  # Positive: the shortest correct, 100, at index 1 (index 2 ties and loses to the lower index).
  # Correct: 0 (1.2x) no, 2 (1.0x tie) no, 3 (exactly 1.5x) yes, 4 (1.4x) no.
  # Wrong: 5 (shorter) no, 6 (equal length) no, 7 (one token longer) yes, 8 yes.
  assert dpo.build_dpo_pairs(lengths, correct) == [(1, 3), (1, 7), (1, 8)]
  assert dpo.build_dpo_pairs(lengths, correct, long_factor=1.2) == [(1, 0), (1, 3), (1, 4), (1, 7), (1, 8)]


def test_dpo_no_correct_or_nothing_to_reject():
  assert dpo.build_dpo_pairs([10, 20, 30], [0, 0, 0]) == []
  assert dpo.build_dpo_pairs([30, 20, 10], [1, 0, 0]) == []  # every wrong answer is shorter


def test_dpo_batch_flat_indices():
  pairs = dpo.build_dpo_pairs_batch([[10, 20, 15], [50, 40, 60]], [[1, 0, 1], [0, 1, 1]])
  # Group 0: positive 0; 1 is wrong and longer, 2 is correct at 1.5x. Group 1: positive 1 (-> 4); 0 wrong and
  # longer (-> 3); 2 correct at 1.5x (-> 5).
  assert pairs == [(0, 1), (0, 2), (4, 3), (4, 5)]


def test_dpo_loss_formula_by_hand():
  # -log sigmoid(beta*((logp_c - ref_c) - (logp_r - ref_r))) on fixed numbers, beta = 0.5:
  # pair 0: (-3 - -4) - (-9 - -8) = 1 - (-1) = 2 -> x = 1.0;  pair 1: (-6 - -5) - (-7 - -9) = -1 - 2 = -3 -> x = -1.5.
  loss, m = losses.dpo_loss(jnp.asarray([-3.0, -6.0]), jnp.asarray([-9.0, -7.0]), jnp.asarray([-4.0, -5.0]),
                            jnp.asarray([-8.0, -9.0]), beta=0.5)
  by_hand = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2
  np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], 0.5)
  np.testing.assert_allclose(m["margin_mean"], (1.0 - 1.5) / 2, rtol=1e-6)


def test_shortest_correct_and_sft_set():
  lengths = [[5, 3, 3, 9], [4, 4, 4, 4], [7, 2, 6, 8]]
  correct = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]]
  # Row 0: index 1 (3 tokens) is wrong, index 2 ties it and is correct -> 2. Row 1: none. Row 2: 7 < 8 -> 0.
  np.testing.assert_array_equal(rejection.shortest_correct(lengths, correct), [2, -1, 0])
  examples = [{"inputs_ids": [1, 2]}, {"inputs_ids": [3]}, {"inputs_ids": [4, 5, 6]}]
  responses = [[[9] * n for n in row] for row in lengths]
  responses[0][2] = [7, 8, 9]
  prompts, targets = rejection.rejection_sft_set(examples, responses, lengths, correct, eos_id=1)
  assert prompts == [[1, 2], [4, 5, 6]]
  assert targets == [[7, 8, 9, 1], [9] * 7 + [1]]  # eos appended: the model learns to stop there
  with pytest.raises(ValueError, match="same PxG shape"):
    rejection.shortest_correct([[1, 2]], [[1, 0, 1]])


_init = jax.jit(models.init_params, static_argnums=0)  # one compiled init instead of op-by-op dispatch
_seq_logp = jax.jit(dpo.sequence_logp, static_argnums=0)


def _tiny_trainer():
  cfg = models.ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
  return Trainer(cfg, sharding.make_mesh({"data": -1}))


def test_sequence_logp_sums_the_masked_tokens():
  trainer = _tiny_trainer()
  params = _init(trainer.cfg, jax.random.PRNGKey(0))
  tokens, mask = batching.pack([[3, 4], [5]], [[6, 7, 8], [9, 10]], 8, pad_id=0)
  token_logp = np.asarray(models.token_logprobs(trainer.cfg, params, jnp.asarray(tokens)))
  # Row 0 scores tokens 6, 7, 8 at positions 2..4, i.e. logp columns 1..3; row 1 tokens 9, 10 -> columns 0..1.
  by_hand = [token_logp[0, 1:4].sum(), token_logp[1, 0:2].sum()]
  np.testing.assert_allclose(_seq_logp(trainer.cfg, params, tokens, mask), by_hand, rtol=1e-5)


def test_dpo_train_prefers_chosen_and_keeps_the_reference(tmp_path):
  trainer = _tiny_trainer()
  ref = trainer.init_params(jax.random.PRNGKey(1))
  ref_host = jax.device_get(ref)
  params = trainer.init_params(jax.random.PRNGKey(1))  # the policy starts at the reference
  prompts = [[2, 3], [4, 5, 6], [7, 2], [3, 3]]
  chosen = [[8, 1], [9, 1], [10, 1], [8, 1]]
  rejected = [[11, 12, 13, 1], [12, 11, 1], [13, 13, 13, 1], [11, 1]]
  logger = MetricsLogger(str(tmp_path), "dpo")
  cfg = DPOConfig(steps=8, batch_size=4, learning_rate=3e-3, warmup_steps=1, beta=0.5, long_factor=1.5)
  new = dpo.dpo_train(trainer, params, ref, prompts, chosen, rejected, cfg, pad_id=0, seed=0, logger=logger,
                      log_every=1)
  logger.close()
  rows = metrics_lib.read_jsonl(str(tmp_path / "dpo.jsonl"))
  # Step 1: policy == reference, so every margin is 0 and the loss is -log sigmoid(0) = log 2.
  np.testing.assert_allclose(rows[0]["loss"], math.log(2), rtol=1e-5)
  assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_accuracy"] == 1.0
  # The implicit reward beta*(logp - ref_logp) now favours every chosen response over its rejected one.
  seq_len = 8
  tc, mc = batching.pack(prompts, chosen, seq_len, 0)
  tr, mr = batching.pack(prompts, rejected, seq_len, 0)
  lp = lambda p, t, m: np.asarray(_seq_logp(trainer.cfg, p, t, m))
  margin = (lp(new, tc, mc) - lp(ref_host, tc, mc)) - (lp(new, tr, mr) - lp(ref_host, tr, mr))
  assert np.all(margin > 0), margin
  # The reference was not donated or changed.
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ref_host)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(ValueError, match="beta"):
    dataclasses.replace(cfg, beta=0.0)


def test_merge_checkpoints_on_disk(tmp_path):
  cfg = models.ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                           qkv_bias=True)
  a, b = _init(cfg, jax.random.PRNGKey(0)), _init(cfg, jax.random.PRNGKey(1))
  models.save_hf(str(tmp_path / "a"), cfg, a)
  models.save_hf(str(tmp_path / "b"), cfg, b)
  merge.merge_checkpoints(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "m"), (0.3, 0.7))
  cfg_m, m = models.load_hf(str(tmp_path / "m"))
  assert cfg_m == cfg
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(m)):
    np.testing.assert_allclose(z, 0.3 * np.asarray(x) + 0.7 * np.asarray(y), rtol=1e-6, atol=1e-7)
  wide = dataclasses.replace(cfg, d_ff=48)
  models.save_hf(str(tmp_path / "wide"), wide, _init(wide, jax.random.PRNGKey(2)))
  with pytest.raises(ValueError, match=r"different architectures.*'d_ff': \(32, 48\)"):
    merge.merge_checkpoints(str(tmp_path / "a"), str(tmp_path / "wide"), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


def test_report_rows_table_and_csv(tmp_path):
  results = {"long": {"accuracy": 0.8, "mean_tokens": 50.0, "tokens_per_correct": 62.5},
             "rl": {"accuracy": 0.79, "mean_tokens": 30.0, "tokens_per_correct": 30.0 / 0.79}}
  rows = report.rows_against(results)
  assert rows[0]["token_change"] == 0.0 and rows[0]["accuracy_change_points"] == 0.0
  np.testing.assert_allclose(rows[1]["token_change"], -0.4)  # 30 / 50 - 1
  np.testing.assert_allclose(rows[1]["accuracy_change_points"], -1.0)
  table = report.markdown_table(rows, {"rl": "RL from long"})
  assert "| rl (RL from long) | 79.0% | 30.0 | 38.0 | -40.0% | -1.0 pts |" in table
  report.write_csv(str(tmp_path / "t.csv"), rows)
  with open(tmp_path / "t.csv") as f:
    read = list(csv.DictReader(f))
  assert [r["variant"] for r in read] == ["long", "rl"] and float(read[1]["mean_tokens"]) == 30.0
  report.plot(str(tmp_path / "t.png"), rows)
  assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="baseline variant 'long'"):
    report.rows_against({"rl": results["rl"]})


def test_config_checks_name_the_field():
  base = arith_config.get_config("smoke")

  def build(**fields):
    c = base.copy_and_resolve_references()
    for path, value in fields.items():
      *parents, leaf = path.split("__")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config_lib.from_config_dict(c)

  assert build().long2short.variants == base.long2short.variants
  assert [config_lib.long2short_start(v) for v in ("rl_long", "rl_merge_rs", "rl_x", "merge")] == [
      "long", "merge_rs", None, None]
  cases = [
      (dict(long2short__variants=("long", "fast")), r"long2short.variants: unknown \['fast'\]"),
      (dict(long2short__variants=("long", "rl_rl_long")), r"variants: unknown \['rl_rl_long'\]"),
      (dict(long2short__variants=("long", "merge")), r"'merge' is built from \['short'\]"),
      (dict(long2short__variants=("short", "merge")), "must include 'long'"),
      (dict(long2short__variants=("long", "rl_dpo", "dpo")), r"'rl_dpo' is built from \['dpo'\]"),
      (dict(long2short__short_init="base"), "long2short.short_init: must be one of"),
      (dict(long2short__merge_weights=(0.5, 0.6)), "sum to 1"),
      (dict(long2short__samples_per_prompt=1), "long2short.samples_per_prompt: must be >= 2"),
  ]
  for fields, match in cases:
    with pytest.raises(config_lib.ConfigError, match=match):
      build(**fields)
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.long2short.rl.max_len = 10
  with pytest.raises(config_lib.ConfigError, match=r"long2short.rl.max_len: not a field of config.rl"):
    config_lib.from_config_dict(c)


def test_long2short_rl_replaces_only_the_listed_fields():
  base = arith_config.get_config()
  typed = config_lib.from_config_dict(base)
  derived = typed.long2short.rl
  for k, v in base.long2short.rl.items():
    assert getattr(derived, k) == (tuple(v) if isinstance(v, tuple) else v), k
  assert derived.length_penalty_warmup == 0 and derived.curriculum == ()
  assert derived.max_response_len < typed.rl.max_response_len  # much smaller than the main job's
  untouched = [k for k in base.rl if k not in base.long2short.rl]
  assert untouched and all(getattr(derived, k) == getattr(typed.rl, k) for k in untouched)
