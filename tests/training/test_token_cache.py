"""TokenCache: a frozen tokenizer's maps, encoded once per sample key."""

import torch

from t2i.training.task import TokenCache


def _encoder(calls):
    def encode(images):
        calls.append(len(images))
        return (images.flatten(1)[:, :4] * 100).long() % 300  # codes up to 299
    return encode


def test_each_key_is_encoded_once_and_maps_equal_a_fresh_encoding():
    calls = []
    cache = TokenCache(_encoder(calls))
    images = torch.rand(6, 3, 2, 2)
    keys = [f"s{i}" for i in range(6)]
    first = cache(images[:4], keys[:4])
    again = cache(images[[2, 3, 4, 5]], keys[2:])  # two known, two new
    assert calls == [4, 2]
    assert first.dtype == torch.long
    assert torch.equal(first, _encoder([])(images[:4]))
    assert torch.equal(again, _encoder([])(images[2:]))


def test_no_keys_or_a_full_cache_encode_every_time():
    calls = []
    cache = TokenCache(_encoder(calls), limit=2)
    images = torch.rand(4, 3, 2, 2)
    cache(images, None)
    cache(images, None)
    assert calls == [4, 4]
    cache(images, ["a", "b", "c", "d"])
    cache(images, ["a", "b", "c", "d"])
    assert calls == [4, 4, 4, 2] and len(cache.store) == 2


def test_encoding_runs_in_full_precision_under_autocast():
    seen = []

    def encode(images):
        seen.append(torch.is_autocast_enabled("cpu"))
        weight = torch.randn(images[0].numel(), 4, generator=torch.Generator().manual_seed(0))
        out = images.flatten(1) @ weight
        seen.append(out.dtype)
        return out.argmax(-1, keepdim=True)

    cache = TokenCache(encode)
    with torch.autocast("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
        cache(torch.rand(3, 3, 2, 2), ["a", "b", "c"])
        cache(torch.rand(3, 3, 2, 2))
    assert seen == [False, torch.float32] * 2
