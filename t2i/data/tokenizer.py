"""Caption tokenizers that need no download.

Both give fixed-length ids with <bos> ... <eos> then <pad>, and a mask (True = token):
- `ByteTokenizer`: UTF-8 bytes; no training, any text, 259 ids.
- `BPETokenizer`: byte-level BPE trained on the data set's captions with the `tokenizers`
  library; ~4x shorter sequences on the synthetic captions.
Ids 0, 1, 2 are <pad>, <bos>, <eos> in both. `save(dir)` writes one file,
`t2i_tokenizer.json`, that `load_tokenizer(dir)` reads back beside a model.

    >>> tok = ByteTokenizer(max_length=16)
    >>> ids, mask = tok(["a red circle"])    # long [1, 16], bool [1, 16]
    >>> tok.decode(ids[0])
    'a red circle'
"""

import json
import os
from collections.abc import Iterable, Sequence

import torch

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
FILENAME = "t2i_tokenizer.json"


class Tokenizer:
    """Fixed-length encoding shared by the tokenizers; subclasses map text <-> content ids."""

    kind = ""
    vocab_size = 0

    def __init__(self, max_length: int = 64):
        if max_length < 3:
            raise ValueError(f"max_length must leave room for <bos>, <eos> and one token, "
                             f"got {max_length}")
        self.max_length = max_length

    def _content_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _content_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> tuple[list[int], bool]:
        """-> (ids with <bos>/<eos>, unpadded, at most max_length; whether it was truncated)."""
        content = self._content_ids(text)
        room = self.max_length - 2
        return [BOS, *content[:room], EOS], len(content) > room

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of the ids between <bos> and <eos>; padding and specials are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        content = []
        for i in ids:
            if i == EOS:
                break
            if i > EOS:
                content.append(i)
        return self._content_text(content)

    def pad(self, encoded: Iterable[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded sequences -> (ids long [B, max_length], mask bool [B, max_length])."""
        encoded = list(encoded)
        ids = torch.full((len(encoded), self.max_length), PAD, dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != PAD

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids long [B, L], mask bool [B, L]), L = max_length; truncates."""
        if isinstance(texts, str):
            texts = [texts]
        return self.pad(self.encode(t)[0] for t in texts)

    def _config(self) -> dict:
        return {"kind": self.kind, "max_length": self.max_length}

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILENAME)
        with open(path, "w") as f:
            json.dump(self._config(), f)
        return path


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = 256 + len(SPECIALS)

    def _content_ids(self, text: str) -> list[int]:
        return [b + len(SPECIALS) for b in text.encode("utf-8")]

    def _content_text(self, ids: list[int]) -> str:
        return bytes(i - len(SPECIALS) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (lossless on any text) from the `tokenizers` library.

    The BPE model has no special tokens of its own (`tokenizers` would find "<eos>" inside
    a caption and turn it into one); its ids are shifted past ours instead.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer, max_length: int = 64):
        super().__init__(max_length)
        self._hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size() + len(SPECIALS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, max_length: int = 64):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIALS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf, max_length)

    def _content_ids(self, text: str) -> list[int]:
        return [i + len(SPECIALS) for i in self._hf.encode(text).ids]

    def _content_text(self, ids: list[int]) -> str:
        return self._hf.decode([i - len(SPECIALS) for i in ids])

    def _config(self) -> dict:
        return {**super()._config(), "bpe": self._hf.to_str()}


def load_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer saved under `directory` (a run or export folder)."""
    path = os.path.join(directory, FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer saved in {directory} (expected {FILENAME})")
    with open(path) as f:
        config = json.load(f)
    if config["kind"] == "byte":
        return ByteTokenizer(config["max_length"])
    if config["kind"] == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(config["bpe"]), config["max_length"])
    raise ValueError(f"{path}: unknown tokenizer kind {config['kind']!r}")
