"""Tokenizers behind one small interface: SentencePiece models and HF tokenizer.json files.

`encode` never adds BOS or EOS; callers append `eos_id` (and prepend `bos_id`, if they want one) themselves,
so prompt and response ids concatenate without surprises. No TensorFlow here: seqio wraps the same
SentencePiece model in k15/data/tasks.py.
"""
import abc
import io
import json
import os
from typing import Iterable, Optional, Sequence

import sentencepiece as spm
import tokenizers


class Tokenizer(abc.ABC):
  """Text <-> ids. `bos_id` may be None; `pad_id` and `eos_id` always exist."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Ids of `text`, with no BOS/EOS added."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special ids (pad, eos, bos) and ids past the vocabulary decode to nothing.

    A model's embedding table may be larger than the vocabulary (padded rows); samples can hit those ids.
    """

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> Optional[int]:
    ...

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file. Its pad and eos must be defined (train_sentencepiece does so)."""

  def __init__(self, model_path: str):
    self.model_path = os.fspath(model_path)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    except (OSError, RuntimeError) as e:  # sentencepiece's errors do not name the file
      raise ValueError(f"{self.model_path}: not a readable SentencePiece model ({e}); truncated or empty?") from None
    for name, i in (("pad", self._sp.pad_id()), ("eos", self._sp.eos_id())):
      if i < 0:
        raise ValueError(f"SentencePiece model {self.model_path} has no {name} id; train it with {name}_id >= 0")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    n = self._sp.get_piece_size()
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> Optional[int]:
    i = self._sp.bos_id()
    return None if i < 0 else i

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()


# Options that make training reproducible and text round-trip exactly (newlines and repeated spaces survive,
# a word at the start of a text gets the same ids as at the start of a line).
_SPM_DEFAULTS = dict(
    model_type="bpe",
    pad_id=0, eos_id=1, unk_id=2, bos_id=3,
    split_digits=True,  # every digit its own token
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    hard_vocab_limit=False,  # a small corpus may hold fewer pieces than vocab_size asks for
    user_defined_symbols=["\n"],
    num_threads=1,  # one thread: the same corpus gives the same model
    minloglevel=2,
)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        **opts) -> SentencePieceTokenizer:
  """Trains `<model_prefix>.model` on `texts` (each may span lines) and loads it.

  Ids 0..3 are pad, eos, unk, bos. `opts` override SentencePieceTrainer flags; with the defaults the
  vocabulary may come out smaller than `vocab_size` on a small corpus (check `.vocab_size`).
  """
  flags = dict(_SPM_DEFAULTS, **opts)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, **flags)
  path = f"{model_prefix}.model"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return SentencePieceTokenizer(path)


_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|end_of_text|>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")


def _token_name(value) -> Optional[str]:
  """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizer.json` through the `tokenizers` package.

  Special tokens come from the arguments, else from a `tokenizer_config.json` beside the file, else from
  common names. A missing pad falls back to eos (the usual choice for decoder-only models).
  """

  def __init__(self, tokenizer_json_path: str, eos_token: Optional[str] = None,
               pad_token: Optional[str] = None, bos_token: Optional[str] = None):
    self.path = os.fspath(tokenizer_json_path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # pylint: disable=broad-except  # tokenizers raises its own error type
      raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from None
    config = {}
    config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
    if os.path.exists(config_path):
      try:
        with open(config_path) as f:
          config = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    eos_token = eos_token or _token_name(config.get("eos_token"))
    pad_token = pad_token or _token_name(config.get("pad_token"))
    bos_token = bos_token or _token_name(config.get("bos_token"))
    self._eos_id = self._find("eos", eos_token, _EOS_NAMES)
    if self._eos_id is None:
      raise ValueError(f"no eos token found in {self.path}; tried {list(_EOS_NAMES)}, pass eos_token=")
    pad = self._find("pad", pad_token, _PAD_NAMES)
    self._pad_id = self._eos_id if pad is None else pad
    self._bos_id = self._find("bos", bos_token, _BOS_NAMES)

  def _find(self, kind: str, name: Optional[str], candidates: Sequence[str]) -> Optional[int]:
    if name is not None:  # an explicit name must exist
      i = self._tok.token_to_id(name)
      if i is None:
        raise ValueError(f"{kind} token {name!r} is not in the vocabulary of {self.path}")
      return i
    for c in candidates:
      i = self._tok.token_to_id(c)
      if i is not None:
        return i
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str, **kwargs) -> Tokenizer:
  """A SentencePiece `.model`, a `tokenizer.json`, or a directory holding a `tokenizer.json`."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, **kwargs)
  if path.endswith(".json"):
    return HFTokenizer(path, **kwargs)
  raise ValueError(f"cannot tell the tokenizer type of {path!r}: expected a .model file or a tokenizer.json")


def check_tokenizer_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises when the tokenizer can emit ids the model's embedding table does not have."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's vocab_size "
                     f"{model_vocab_size}; raise ModelConfig.vocab_size to at least {tokenizer.vocab_size}")
