import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from t2i.data.scenes import Renderer, sample_scene
from t2i.data.tokenizer import EOS, PAD, BPETokenizer, ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def captions():
    import numpy as np

    rng, renderer = np.random.default_rng(0), Renderer(32)
    return [sample_scene(rng, renderer, held_out=False)[2] for _ in range(300)]


@pytest.fixture(scope="module")
def bpe(captions):
    return BPETokenizer.train(captions, vocab_size=400, max_length=512)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer(max_length=200)
    ids, truncated = tok.encode(text)
    assert not truncated and tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)[0]) == text


def test_bpe_round_trips_captions_and_is_shorter_than_bytes(bpe, captions):
    ids, mask = bpe(captions)
    assert [bpe.decode(row) for row in ids] == captions
    assert mask.sum(1).max() < 64
    byte_lengths = [len(ByteTokenizer(400).encode(c)[0]) for c in captions]
    assert mask.sum().item() * 3 < sum(byte_lengths)


@pytest.mark.parametrize("make", [lambda c: ByteTokenizer(10),
                                  lambda c: BPETokenizer.train(c, 300, 10)], ids=["byte", "bpe"])
def test_truncation_padding_and_mask(make, captions):
    tok = make(captions)
    ids, truncated = tok.encode(captions[0])
    assert truncated and len(ids) == 10 and ids[-1] == EOS
    batch, mask = tok(["a", captions[0]])
    assert batch.shape == (2, 10) and mask.dtype == torch.bool
    assert mask[0].sum() == 3 and (batch[0, 3:] == PAD).all()
    assert mask[1].all()


@pytest.mark.parametrize("make", [lambda c: ByteTokenizer(32),
                                  lambda c: BPETokenizer.train(c, 300, 32)], ids=["byte", "bpe"])
def test_save_and_load_give_the_same_ids(tmp_path, make, captions):
    tok = make(captions)
    tok.save(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded) is type(tok) and loaded.max_length == 32
    assert torch.equal(loaded(captions)[0], tok(captions)[0])


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_length"):
        ByteTokenizer(2)
    with pytest.raises(FileNotFoundError, match="no tokenizer saved"):
        load_tokenizer(str(tmp_path))
