"""Model-based rewards: verdict parsing, the value head's loss and gradient by hand, batch order and failure reasons
through the Verifier, frozen judge params, sharded scoring equal to one device, and the labelled data."""
import dataclasses
import fractions

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import arith as arith_config
from k15 import config as config_lib
from k15 import models, sharding
from k15.data import arith, rm_data
from k15.data import tokenizer as tokenizer_lib
from k15.rewards import reward_model as rm
from k15.rewards.verifiers import Verifier, methods_by_domain
from k15.rl.trainer import Trainer

CFG = models.ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         tie_embeddings=True)


@pytest.mark.parametrize("text, verdict, reason", [
    ('Value: 7\nMatch: yes\n{"correct": true}', True, "judged correct"),
    ('{"correct": false}', False, "judged wrong"),
    ('reasoning {x} then {"correct":true}\n', True, "judged correct"),  # braces without "correct" are reasoning
    ('Match: yes\n{"correct": yes}', None, "invalid verdict"),
    ('{"correct": "true"}', None, "invalid verdict"),
    ('{"correct": true', None, "no verdict"),  # cut at the token cap
    ("Match: yes", None, "no verdict"),
    ("", None, "no verdict"),
    ('{"correct": true}\n{"correct": true}', None, "multiple verdicts"),
    ('{"correct": true} {"correct": false}', None, "multiple verdicts"),
])
def test_parse_verdict(text, verdict, reason):
  got, why = rm.parse_verdict(text)
  assert got is verdict and why.startswith(reason), (got, why)


def test_hidden_states_are_what_the_output_head_reads():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  tokens = jnp.array([[3, 5, 7, 9], [2, 4, 6, 8]])
  h = models.hidden_states(CFG, params, tokens)
  np.testing.assert_allclose(h @ params["embed"]["embedding"].T, models.forward(CFG, params, tokens), atol=1e-5)


def test_value_loss_and_gradient_by_hand():
  z, y = jnp.array([0.0, 2.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
  loss, metrics = rm.value_loss(z, y)
  hand = (np.log(2) + np.log(1 + np.e ** 2) + np.log(1 + np.e)) / 3  # -log s(0), -log(1 - s(2)), -log s(-1)
  assert float(loss) == pytest.approx(hand, rel=1e-6)
  assert float(metrics["accuracy"]) == 0.0  # z=0 is no "yes" (label 1), z=2 says yes (label 0), z=-1 says no (label 1)
  sig = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
  np.testing.assert_allclose(jax.grad(lambda z: rm.value_loss(z, y)[0])(z), (sig - np.array([1, 0, 1])) / 3,
                             rtol=1e-6)
  # weight-0 rows are padding: they change neither the loss nor the gradient
  loss_w = rm.value_loss(jnp.array([0.0, 2.0, -1.0, 5.0]), jnp.array([1.0, 0.0, 1.0, 1.0]),
                         jnp.array([1.0, 1.0, 1.0, 0.0]))[0]
  assert float(loss_w) == pytest.approx(hand, rel=1e-6)


def test_value_head_gradient_by_hand():
  """d loss / d head = mean_b (s(z_b) - y_b) * h_b at each row's last token; the logit reads that token only."""
  params = {"model": models.init_params(CFG, jax.random.PRNGKey(0)), "head": rm.init_value_head(CFG)}
  params["head"] = {"w_D": jax.random.normal(jax.random.PRNGKey(1), (CFG.d_model,)), "b": jnp.float32(0.3)}
  tokens = jnp.array([[3, 5, 7, 9, 0, 0], [2, 4, 6, 8, 10, 12]])
  lengths, labels = jnp.array([4, 6]), jnp.array([1.0, 0.0])
  h = models.hidden_states(CFG, params["model"], tokens)
  last = np.stack([h[0, 3], h[1, 5]])
  z = last @ np.asarray(params["head"]["w_D"]) + 0.3
  np.testing.assert_allclose(rm.value_logits(CFG, params, tokens, lengths), z, rtol=1e-5)
  # padding after the last token changes nothing
  np.testing.assert_allclose(rm.value_logits(CFG, params, tokens.at[0, 4:].set(77), lengths), z, rtol=1e-5)
  grads = jax.grad(lambda p: rm.value_loss(rm.value_logits(CFG, p, tokens, lengths), labels)[0])(params)
  coef = (1 / (1 + np.exp(-z)) - np.array([1.0, 0.0])) / 2
  np.testing.assert_allclose(grads["head"]["w_D"], coef @ last, rtol=1e-4, atol=1e-6)
  assert float(grads["head"]["b"]) == pytest.approx(coef.sum(), rel=1e-5)


def test_fit_temperature_recovers_the_scale():
  rng = np.random.default_rng(0)
  true_logits = rng.normal(0, 2, 4000)
  labels = rng.random(4000) < 1 / (1 + np.exp(-true_logits))
  assert rm.fit_temperature(3.0 * true_logits, labels) == pytest.approx(3.0, rel=0.15)


@pytest.fixture(scope="module")
def judge_tokenizer(tmp_path_factory):
  problems = arith.generate(60, 0, (1, 2, 3, 4))
  pairs = rm_data.generate_pairs(problems, 200, 0)
  corpus = [rm.TEMPLATE.format(question=p["question"], reference=p["answer"], response=p["response"])
            + rm_data.cot_target(p) for p in pairs]
  path = str(tmp_path_factory.mktemp("judge_tok") / "spm")
  return tokenizer_lib.train_sentencepiece(corpus, path, 120, user_defined_symbols=rm_data.SYMBOLS), pairs


def _rollout(**overrides):
  """The smoke config's sampler settings on the model's own passes."""
  rollout = config_lib.from_config_dict(arith_config.get_config("smoke")).sampling
  return dataclasses.replace(rollout, **{"backend": "model", "num_slots": 8, **overrides})


class _ScriptedCoT(rm.CoTJudge):
  """A CoT judge whose "generation" reads the reference and the response's last line from its input, so outputs
  are known: right when they match, a broken verdict for "Answer: 5"."""

  def generate(self, prompts):
    outs = []
    for ids in prompts:
      text = self.tokenizer.decode(ids)
      ref = text.split("Reference answer: ")[1].split("\n")[0]
      final = text.split("Response: ")[1].split("\nJudge:")[0].rsplit("\n", 1)[-1]
      if final == "Answer: 5":
        outs.append("Match: maybe")
      else:
        outs.append(rm.verdict_line(final == f"Answer: {ref}"))
    return outs


def test_verifier_keeps_batch_order_and_gives_a_reason_for_each_failure(judge_tokenizer):
  tok, _ = judge_tokenizer
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  judge = _ScriptedCoT(CFG, params, tok, rm.JudgeSpec("cot_rm"), _rollout())
  examples = [dict(question=f"Compute {a}+0.", answer=str(a), domain=d) for a, d in
              zip([1, 2, 3, 4, 5, 6], ["arith", "math", "arith", "math", "arith", "arith"])]
  texts = ["Answer: 1", "Answer: 9", "Answer: 3", "Answer: 4", "Answer: 5", "Answer: 2"]
  with Verifier(judges={"cot_rm": judge}, by_domain=methods_by_domain("cot_rm", {})) as v:
    np.testing.assert_array_equal(v(texts, examples), [1, 0, 1, 1, 0, 0])
    assert v.judge_failures == 1 and v.reasons["cot_rm: no verdict"] == 1
    assert v.reasons["cot_rm: judged correct"] == 3 and v.reasons["cot_rm: judged wrong"] == 2
    assert v.judge_time_s > 0
  # a mix: arith by its rules (in-process regex), math by the judge, in the batch's order
  judge.failures = 0
  with Verifier(judges={"cot_rm": judge}, by_domain=methods_by_domain("mix", {"math": "cot_rm"})) as v:
    np.testing.assert_array_equal(v(texts, examples), [1, 0, 1, 1, 1, 0])
    assert v.judge_failures == 0 and v.reasons["correct"] == 3 and v.reasons["cot_rm: judged correct"] == 1
  with pytest.raises(ValueError, match="no such judge"):
    Verifier(by_domain={"arith": "value_rm"})


def test_value_judge_scores_in_batch_order(judge_tokenizer):
  tok, pairs = judge_tokenizer
  params = {"model": models.init_params(CFG, jax.random.PRNGKey(0)),
            "head": {"w_D": jax.random.normal(jax.random.PRNGKey(1), (CFG.d_model,)), "b": jnp.float32(0.0)}}
  judge = rm.ValueJudge(CFG, params, tok, rm.JudgeSpec("value_rm", value_reward="probability"), rows=8)
  texts, examples = [p["response"] for p in pairs[:11]], pairs[:11]
  batch = [r.reward for r in judge.score(texts, examples)]
  alone = [judge.score([t], [ex])[0].reward for t, ex in zip(texts, examples)]
  np.testing.assert_allclose(batch, alone, rtol=1e-5)
  assert len(set(np.round(batch, 6))) > 5  # the rows differ: an order mix-up would show


def test_judge_params_are_never_updated_by_the_policy_optimizer(judge_tokenizer):
  """The judge loaded from the policy's own params (the worst case) keeps its values while the policy trains with
  donated params; its arrays are not the policy's."""
  tok, _ = judge_tokenizer
  mesh = sharding.make_mesh({"data": -1})
  trainer = Trainer(CFG, mesh)
  policy = trainer.init_params(jax.random.PRNGKey(0))
  before = jax.device_get(policy)
  judge = rm.ValueJudge(CFG, {"model": policy, "head": rm.init_value_head(CFG)}, tok, rm.JudgeSpec("value_rm"),
                        mesh=mesh)
  leaves = lambda t: {id(x) for x in jax.tree.leaves(t)}
  assert not leaves(judge.params) & leaves(policy)
  tokens = np.tile(np.arange(1, 9, dtype=np.int32), (8, 1))
  def loss_fn(p, batch):
    loss = -jnp.mean(models.token_logprobs(CFG, p, batch["tokens"]))
    return loss, {"loss": loss}
  opt = optax.adam(1e-2)
  step = trainer.make_step(loss_fn, opt)
  opt_state = trainer.init_opt_state(opt, policy)
  for _ in range(2):
    policy, opt_state, _ = step(policy, opt_state, {"tokens": tokens})
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), policy, before)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the policy trained
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), judge.params["model"], before)
  assert judge.score(["Answer: 1"], [dict(question="Compute 1+0.", answer="1")])[0].reason.startswith("value_rm")


def test_rm_data_labels_come_from_the_canonical_value():
  problems = arith.generate(50, 3, (1, 2, 3, 4))
  pairs = rm_data.generate_pairs(problems, 700, 3)
  assert {p["form"] for p in pairs} == set(rm_data.FORMS)
  for p in pairs:
    if p["form"] == "truncated":
      assert not p["correct"] and "Answer:" not in p["response"] and p["final"] is None
      continue
    assert p["response"].endswith(p["final"]) or p["final"] in p["response"].rsplit("\n", 1)[-1]
    value = fractions.Fraction(p["value"])
    assert p["correct"] == (value == int(p["answer"]))
    if p["form"] == "words":
      assert p["final"] == rm_data.number_words(int(value))
    if p["form"] in ("fraction", "expression"):
      if "/" in p["final"]:
        assert fractions.Fraction(p["final"]) == value
      else:
        assert eval(p["final"]) == value  # pylint: disable=eval-used  # our own digits and + - *
  for form in set(rm_data.FORMS) - {"truncated"}:
    labels = [p["correct"] for p in pairs if p["form"] == form]
    assert 0.25 < np.mean(labels) < 0.75, form  # correct and wrong-but-plausible both
  assert rm_data.number_words(-1) == "minus one" and rm_data.number_words(42) == "forty-two"
  assert rm_data.cot_target(pairs[0]).endswith(rm.verdict_line(pairs[0]["correct"]))


def test_cot_target_steps_are_true_arithmetic_and_decide_the_label():
  """Every step of a CoT target holds (checked by Python's own arithmetic), and the trace's last result against the
  reference (a fraction: the check's product against the numerator) gives the label."""
  pairs = rm_data.generate_pairs(arith.generate(80, 5, (1, 2, 3, 4)), 900, 5)
  assert rm_data.expression_steps("3*2+2") == "3*2=6, 6+2=8" and rm_data.expression_steps("-1-1") == "-1-1=-2"
  for p in pairs:  # the "value" style names the value at once
    lines = dict(l.split(": ", 1) for l in rm_data.cot_target(p, "value").split("\n")[:-1])
    if p["final"] is not None:
      assert lines["Value"] == (p["value"] if "/" not in p["value"] else "not a whole number")
      assert lines["Match"] == ("yes" if p["correct"] else "no") and lines["Reference"] == p["answer"]
  with pytest.raises(ValueError, match="unknown CoT trace"):
    rm_data.cot_target(pairs[0], "prose")
  for p in pairs:
    lines = dict(l.split(": ", 1) for l in rm_data.cot_target(p, "steps").split("\n")[:-1])
    if p["final"] is None:
      assert lines == {"Final answer": "none"} and not p["correct"]
      continue
    assert lines["Final answer"] == p["final"] and lines["Reference"] == p["answer"]
    assert lines["Match"] == ("yes" if p["correct"] else "no")
    if p["form"] == "fraction":
      product, numerator = lines["Check"].split(", numerator ")
      assert numerator == p["final"].split("/")[0]
      left, right = product.split("=")
      assert eval(left) == int(right)  # pylint: disable=eval-used  # our own digits and *
      assert (right == numerator) == p["correct"], p
      continue
    for step in lines["Value"].split(", ") if p["form"] == "expression" else []:
      left, right = step.split("=")
      assert eval(left) == int(right), step  # pylint: disable=eval-used
    if "/" not in p["value"]:
      assert lines["Value"].rsplit("=", 1)[-1] == p["value"]
      assert (lines["Value"].rsplit("=", 1)[-1] == p["answer"]) == p["correct"], p


def test_question_of_an_arith_prompt_is_the_question():
  assert rm.question_of({"inputs_text": arith.prompt_text("Compute 7+2."), "answer": "9"}) == "Compute 7+2."
  assert rm.question_of({"question": "What is 2+2?", "inputs_text": "x"}) == "What is 2+2?"


def test_sft_token_weights_select_what_is_learned():
  """sft_train's weights: all zero changes nothing; ones train (the CoT RM weighs its judging tokens)."""
  from k15.config import SFTConfig  # pylint: disable=g-import-not-at-top
  from k15.rl import sft  # pylint: disable=g-import-not-at-top
  trainer = Trainer(CFG, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]]
  cfg = SFTConfig(steps=2, batch_size=2, learning_rate=1e-2, warmup_steps=1)
  start = jax.device_get(trainer.init_params(jax.random.PRNGKey(0)))
  for w, moves in ((0.0, False), (1.0, True)):
    out = sft.sft_train(trainer, trainer.place_params(start), prompts, responses, cfg, pad_id=0, seed=0,
                        weights=[[w] * len(r) for r in responses])
    delta = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(start)))
    assert (delta > 1e-4) == moves, (w, delta)


def test_cot_errors_locate_the_wrong_lines():
  from experiments import train_rm  # pylint: disable=g-import-not-at-top
  pair = lambda final, value, answer, correct, form: dict(final=final, value=value, answer=answer, correct=correct,
                                                         form=form)
  pairs = [pair("3*2+2", "8", "6", False, "expression"), pair("14/2", "7", "7", True, "fraction"),
           pair("9-4", "5", "5", True, "expression")]
  outputs = ["Final answer: 3*2+2\nValue: 3*2=6, 6+2=6\nReference: 6\nMatch: yes\n{\"correct\": true}",  # copied
             "Final answer: 14/2\nReference: 7\nCheck: 7*2=14, numerator 14\nMatch: yes\n{\"correct\": true}",  # right
             "Final answer: 9-4\nValue: 9-4=5\nReference: 5\nMatch: no\n{\"correct\": false}"]  # a wrong match alone
  errors = train_rm.cot_errors(pairs, outputs, [1.0, 1.0, 0.0], trace="steps")
  assert errors == {"wrong verdicts": 2, "wrong lines": {"Value": 1, "Match": 2}, "value copied from the reference": 1}


def test_more_training_pairs_over_fixed_problems_keep_the_held_out_pairs(tmp_path):
  """data.n_problems fixed: a larger n_train adds pairs of the same training problems; the held-out pairs stay."""
  runs = {}
  for n_train in (300, 900):
    out = tmp_path / str(n_train)
    out.mkdir()
    paths = rm_data.prepare_rm_data(str(out), n_train, 40, seed=4, vocab_size=120, n_problems=400)
    runs[n_train] = {k: rm_data.read_pairs(paths[k]) for k in ("train", "eval")}
  assert runs[300]["eval"] == runs[900]["eval"]
  small, large = runs[300]["train"], runs[900]["train"]
  assert len(large) == 900 and large[:300] == small  # the same draws, then more
  questions = lambda pairs: {p["question"] for p in pairs}
  assert len(questions(large)) <= 400 - 40  # drawn from the same pool of training problems
  assert not questions(large) & questions(runs[900]["eval"])
