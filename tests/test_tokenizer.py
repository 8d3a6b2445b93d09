"""Tokenizers: SentencePiece training and loading, HF tokenizer.json, dispatch and the vocab-size check."""
import json
import os
import subprocess
import sys

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from k15.data import tokenizer as tok_lib

CORPUS = [
    "Compute 37+8-12.\nThink step by step.\n",
    "Plan: 2 steps, left to right.\n37+8=45\n45-12=33\nAnswer: 33",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 1024 and 9876 and 5 are spelled digit by digit.",
] * 20
TEXT = "Plan: 3 steps.\n40-95=-55\n  spaced  out\nAnswer: -55"


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  return tok_lib.train_sentencepiece(CORPUS, str(tmp_path_factory.mktemp("spm") / "a"), vocab_size=128)


def test_sentencepiece_round_trip_and_special_ids(spm_tok):
  assert spm_tok.decode(spm_tok.encode(TEXT)) == TEXT  # newlines and double spaces survive
  assert (spm_tok.pad_id, spm_tok.eos_id, spm_tok.bos_id) == (0, 1, 3)
  ids = spm_tok.encode("Answer: 33")
  assert spm_tok.eos_id not in ids and spm_tok.bos_id not in ids  # encode adds nothing
  assert spm_tok.decode([spm_tok.bos_id] + ids + [spm_tok.eos_id, spm_tok.pad_id]) == "Answer: 33"
  assert spm_tok.decode(ids + [spm_tok.vocab_size, 10**6]) == "Answer: 33"  # padded embedding rows


def test_sentencepiece_vocab_larger_than_the_corpus_supports(tmp_path):
  # The corpus holds ~230 pieces; the default hard_vocab_limit=False trains a smaller vocab instead of failing.
  with pytest.raises(RuntimeError, match="Vocabulary size too high"):
    tok_lib.train_sentencepiece(CORPUS, str(tmp_path / "hard"), vocab_size=1000, hard_vocab_limit=True)
  tok = tok_lib.train_sentencepiece(CORPUS, str(tmp_path / "soft"), vocab_size=1000)
  assert 100 < tok.vocab_size < 1000
  assert tok.decode(tok.encode(TEXT)) == TEXT


def test_sentencepiece_splits_digits(spm_tok):
  ids = spm_tok.encode("1024+9876")
  assert [spm_tok.decode([i]) for i in ids] == list("1024+9876")


def test_sentencepiece_training_is_deterministic(spm_tok, tmp_path):
  again = tok_lib.train_sentencepiece(CORPUS, str(tmp_path / "b"), vocab_size=128)
  assert again.encode(TEXT) == spm_tok.encode(TEXT)
  with open(spm_tok.model_path, "rb") as f, open(again.model_path, "rb") as g:
    assert f.read() == g.read()


def _save_bpe(dirpath):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  path = os.path.join(dirpath, "tokenizer.json")
  tok.save(path)
  return tok, path


def test_hf_tokenizer_round_trip_and_special_ids(tmp_path):
  raw, path = _save_bpe(tmp_path)
  tok = tok_lib.HFTokenizer(path)
  assert tok.decode(tok.encode(TEXT)) == TEXT
  assert tok.encode(TEXT) == raw.encode(TEXT).ids
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  assert tok.decode(tok.encode("hi") + [tok.eos_id, tok.vocab_size + 5]) == "hi"


def test_hf_tokenizer_special_tokens_from_config_and_arguments(tmp_path):
  _, path = _save_bpe(tmp_path)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": {"content": "<pad>"}}, f)  # odd on purpose: the config must win over the name guess
  assert tok_lib.HFTokenizer(path).eos_id == 0
  assert tok_lib.HFTokenizer(path, eos_token="</s>").eos_id == 1
  with pytest.raises(ValueError, match="<nope>"):
    tok_lib.HFTokenizer(path, eos_token="<nope>")


def test_load_tokenizer_dispatches_on_path(spm_tok, tmp_path):
  _, path = _save_bpe(tmp_path)
  assert isinstance(tok_lib.load_tokenizer(spm_tok.model_path), tok_lib.SentencePieceTokenizer)
  assert isinstance(tok_lib.load_tokenizer(path), tok_lib.HFTokenizer)
  assert isinstance(tok_lib.load_tokenizer(str(tmp_path)), tok_lib.HFTokenizer)  # a directory with tokenizer.json
  with pytest.raises(ValueError, match="vocab.txt"):
    tok_lib.load_tokenizer(str(tmp_path / "vocab.txt"))


def test_check_tokenizer_fits(spm_tok):
  tok_lib.check_tokenizer_fits(spm_tok, spm_tok.vocab_size)  # equal is fine
  with pytest.raises(ValueError) as e:
    tok_lib.check_tokenizer_fits(spm_tok, spm_tok.vocab_size - 1)
  assert str(spm_tok.vocab_size) in str(e.value) and str(spm_tok.vocab_size - 1) in str(e.value)


def test_data_modules_do_not_import_tensorflow():
  code = ("import sys, k15.data.tokenizer, k15.data.arith, k15.rewards.arith; "
          "sys.exit('tensorflow' in sys.modules or 'seqio' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
