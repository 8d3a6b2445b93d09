"""Prompt curation: question-kind patterns against hand labels, pass rates and the hack filter on a tiny model."""
import json

import jax
import numpy as np
import pytest

from k15 import models, sampling
from k15.data import curation, prompts
from k15.data import tokenizer as tokenizer_lib

KINDS = [  # (question, hand label)
    ("Which of the following is prime? (A) 4 (B) 6 (C) 7 (D) 9", "multiple_choice"),
    ("What is 2+2?\nA. 3\nB. 4\nC. 5", "multiple_choice"),
    ("Pick the largest.\n(a) 1/2\n(b) 2/3\n(c) 3/5", "multiple_choice"),
    ("Choose the correct value of x if 2x = 8. Options: 2, 4, 8", "multiple_choice"),
    ("Select the best estimate of sqrt(50) from the following: 6, 7, 8.", "multiple_choice"),
    ("True or false: every even number greater than 2 is composite.", "true_false"),
    ("Is the following statement true: 0.999... = 1?", "true_false"),
    ("Determine whether the claim that 91 is prime is true.", "true_false"),
    ("Prove or disprove: the sum of two odd numbers is odd.", "true_false"),
    ("Is 17 a prime number? Answer yes or no.", "true_false"),
    ("Prove that there are infinitely many primes.", "proof"),
    ("Show that the square root of 2 is irrational.", "proof"),
    ("Let n be an integer. Demonstrate that n^2 - n is even.", "proof"),
    ("Give a rigorous proof of the AM-GM inequality for two numbers.", "proof"),
    ("Compute 7+2-5.", None),
    ("Which number is larger, 3/4 or 5/7? Give the larger one.", None),
    ("A train travels at 60 km/h for 2.5 hours. How far does it go?", None),
    ("Let A = {1, 2} and B = {3}. How many elements does A x B have?", None),
    ("Find all real x with x^2 - 5x + 6 = 0.", None),
    ("The approval rate rose from 40% to 50%. By what percent did it increase?", None),  # "approv" is not "prove"
    ("Show your work: what is 12 * 13?", None),
    ("What is the probability that two fair dice show a total of 7?", None),
    ("Evaluate the statement's value: how many divisors does 36 have?", None),
]


@pytest.mark.parametrize("question, kind", KINDS)
def test_excluded_kind(question, kind):
  assert curation.excluded_kind(question) == kind


def test_difficulty_label():
  assert [curation.difficulty_label(r, 5) for r in (1.0, 0.9, 0.8, 0.6, 0.5, 0.3, 0.1, 0.0)] == [1, 1, 2, 3, 3, 4, 5, 5]
  assert [curation.difficulty_label(r, 2) for r in (1.0, 0.5, 0.4, 0.0)] == [1, 2, 2, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny model and a SentencePiece tokenizer trained on the questions it will see."""
  corpus = [q for q, _ in KINDS] + [curation.CurationConfig().cot_template, "Answer: 0123456789"]
  tok = tokenizer_lib.train_sentencepiece(corpus * 5, str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=200)
  cfg = models.ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0)), tok


def test_samples_belong_to_their_prompt(tiny):
  # Greedy: each prompt's n samples equal the sampler's own greedy completion of that prompt, asked for once.
  cfg, params, tok = tiny
  texts = ["Compute 7+2-5.\n", "Find all real x with x^2 - 5x + 6 = 0.\n", "What is 12 * 13?\n"]
  got = curation.sample_responses(cfg, params, tok, texts, n=2, temperature=0.0, max_new_tokens=8,
                                  rng=jax.random.PRNGKey(1), num_slots=6)
  assert [len(g) for g in got] == [2, 2, 2]
  encoded = [tok.encode(t) for t in texts]
  scfg = sampling.SamplingConfig(temperature=1e-6, greedy=True, max_new_tokens=8, stop_ids=(tok.eos_id,),
                                 max_length=16 * -(-(max(map(len, encoded)) + 8) // 16), chunk_size=8)
  # In reverse order, each prompt twice (the batch shape of the call above: one compile for both).
  once = sampling.generate(cfg, params, encoded[::-1] * 2, scfg, jax.random.PRNGKey(7), num_slots=6)
  for samples, traj in zip(got, once[2::-1]):
    want = tok.decode([int(x) for x in traj.response_tokens if int(x) != tok.eos_id])
    assert samples == [want, want]
  assert len({g[0] for g in got}) > 1  # the prompts differ in what they get, so a mix-up would show


def test_curate_end_to_end(tiny, tmp_path):
  cfg, params, tok = tiny
  pool = [dict(p, id=f"p{i}", answer="1") for i, p in enumerate(
      {"question": q} for q in ["Compute 7+2-5.", "True or false: 1 = 1.", "Prove that 2 is prime.",
                                "What is 2+2?\nA. 3\nB. 4", "A train travels at 60 km/h for 2.5 hours. How far?",
                                "Find all real x with x^2 - 5x + 6 = 0.", "What is 12 * 13?"])]
  seen = []

  def reward_fn(texts, ps):
    # Independent truth by construction: p4 is guessable (any direct answer counts), p5 always solved, p6
    # solved by exactly the samples whose text has an even length, p0 never.
    seen.append((list(texts), [p["id"] for p in ps]))
    out = []
    for t, p in zip(texts, ps):
      direct = t.startswith("Answer:")
      out.append(float((p["id"] == "p4" and direct) or (p["id"] == "p5" and not direct)
                       or (p["id"] == "p6" and not direct and len(t) % 2 == 0)))
    return out

  config = curation.CurationConfig(n_samples=6, max_new_tokens=8, direct_max_new_tokens=8, num_slots=16)
  kept, counts = curation.curate(pool, cfg, params, tok, reward_fn, config, jax.random.PRNGKey(0))
  assert counts == {"kept": 3, "true_false": 1, "proof": 1, "multiple_choice": 1, "guessable": 1}
  assert [p["id"] for p in kept] == ["p0", "p5", "p6"]

  (direct_texts, direct_ids), (cot_texts, cot_ids) = seen
  assert direct_ids == [i for i in ("p0", "p4", "p5", "p6") for _ in range(8)]  # 8 direct tries each
  assert all(t.startswith("Answer:") and "\n" not in t for t in direct_texts)
  assert cot_ids == [i for i in ("p0", "p5", "p6") for _ in range(6)]  # n samples each, guessable p4 gone
  p6_rate = np.mean([len(t) % 2 == 0 for t, i in zip(cot_texts, cot_ids) if i == "p6"])
  assert [p["pass_rate"] for p in kept] == [0.0, 1.0, pytest.approx(p6_rate)]
  assert [p["difficulty"] for p in kept] == [5, 1, curation.difficulty_label(p6_rate, 5)]

  path = str(tmp_path / "curated.jsonl")
  prompts.write_jsonl(path, kept)
  back = prompts.read_prompts(path)
  assert [(p["id"], p["difficulty"]) for p in back] == [(p["id"], p["difficulty"]) for p in kept]
  assert json.loads(open(path).readline())["pass_rate"] == 0.0
