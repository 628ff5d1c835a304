"""Muse / MaskGIT generation speed: images/s at batch 1 and 32 for 8, 12 and 24 steps.

The model is muse_shapes.yaml's architecture (32 x 32 tokens of 256 codes run as 8 x 8
positions of 4 x 4, width 192, depth 4, 3 x 3 local mixing, text encoder depth 2) over the
default run's VQGAN (vqgan32_shapes.yaml), randomly initialised: speed does not depend on
the weights.
Guidance is on (scale 3): each step is one transformer call on 2B rows. Figures per row:
images/s; the share of the time spent outside the transformer and text-encoder calls (goal
< 10%) and its two parts, the VQGAN decoder (once per image) and sampling + re-masking
(every step, with the loop's bookkeeping); and the same decoding with the kernels'
reference paths (full sorts and softmaxes: what a plain implementation does) in the same
run. Correctness gate first: seeded decoding repeats itself and the torch path draws the
reference path's tokens.

`bench_painter_generation`: the default run's form — a layout model draws the layout (each
pixel's class and colour) in one pass, then the painter (the same architecture with the
layout embedded) decodes without guidance, one call on B rows a step; the layout model's
pass counts as a network call.
"""

import os
import time

import pytest
import torch

from benchmarks._measure import (
    default_vqgan_config,
    interleaved_medians,
    mib,
    peak_extra_bytes,
    sync,
)
from t2i.data import ByteTokenizer
from t2i.generate import LayoutDrawer, MuseGenerator
from t2i.models.muse import MaskGitTransformer, MuseConfig
from t2i.models.vqgan import VQGAN

PROMPT = "a large red circle on the left. the large red circle is left of the small blue ring"


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    tokenizer = ByteTokenizer(96)
    vqgan = VQGAN(default_vqgan_config()).eval()
    model = MaskGitTransformer(MuseConfig(
        num_codes=vqgan.config.num_codes, grid=32, patch=4, local_kernel=3, dim=192, depth=4,
        heads=6, text_vocab=tokenizer.vocab_size, text_length=96, text_dim=192, text_depth=2,
        text_rotary=True)).eval()
    return MuseGenerator(model, vqgan, tokenizer)


def _run(gen, batch, steps, cfg_scale=3.0):
    return gen([PROMPT] * batch, steps=steps, cfg_scale=cfg_scale, seed=0)


def _with_backend(backend, fn):
    def call():
        old = os.environ.get("T2I_KERNEL_BACKEND")
        os.environ["T2I_KERNEL_BACKEND"] = backend
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["T2I_KERNEL_BACKEND"]
            else:
                os.environ["T2I_KERNEL_BACKEND"] = old
    return call


def _record(record, gen, ours, batch, t_ours, t_ref, device, rounds=5):
    """More timed decodings for the shares outside the network calls (the round with the
    median share: one round swings by a point on a busy machine), then the row."""
    shares = []
    for _ in range(rounds):
        gen.transformer_seconds = gen.decode_seconds = 0.0
        sync(device)
        start = time.perf_counter()
        ours()
        sync(device)
        total = time.perf_counter() - start
        shares.append((1 - gen.transformer_seconds / total, gen.decode_seconds / total))
    outside, decoding = sorted(shares)[rounds // 2]
    record(images_per_s=round(batch / t_ours, 2), outside_transformer=round(outside, 3),
           vqgan_decoder=round(decoding, 3), sampling_and_remasking=round(outside - decoding, 3),
           reference_images_per_s=round(batch / t_ref, 2), vs_reference=round(t_ours / t_ref, 3),
           peak_MiB=mib(peak_extra_bytes(ours, device)))


@pytest.mark.parametrize("steps", [8, 12, 24])
@pytest.mark.parametrize("batch", [1, 32])
def bench_generation(benchmark, record, generator, batch, steps):
    benchmark.group = "generation: Muse base, 32 px, CFG 3 (images/s)"
    _bench_cpu(benchmark, record, generator, batch, steps, 3.0)


def _bench_cpu(benchmark, record, gen, batch, steps, cfg_scale):
    """Gates, then the torch path against the reference path, interleaved; then the row."""
    ours = _with_backend("torch", lambda: _run(gen, batch, steps, cfg_scale))
    ref = _with_backend("reference", lambda: _run(gen, batch, steps, cfg_scale))
    first = ours()
    assert torch.equal(first.tokens, ours().tokens)  # gate: seeded decoding repeats itself
    if batch == 1:  # gate: the fast path draws exactly the reference path's tokens
        assert torch.equal(first.tokens, ref().tokens)
    t_ours, t_ref = interleaved_medians(ours, ref, rounds=3 if batch == 32 else 5)
    benchmark.pedantic(ours, rounds=3, iterations=1)
    _record(record, gen, ours, batch, t_ours, t_ref, "cpu")


@pytest.fixture(scope="module")
def painter(generator):
    """muse_shapes.yaml's painter (each pixel's shape class and colour; its layout skip path
    over a 5 x 5 window of pixels, then an MLP of hidden width 768, computed once a
    generation) and layout model (pixel layouts with colours: a cell a token; the layout
    model 128 wide; rotary text encoders) on the same VQGAN and tokenizer."""
    torch.manual_seed(1)
    config = dict(num_codes=generator.vqgan.config.num_codes, grid=32, patch=4,
                  local_kernel=3, depth=4, text_depth=2, text_vocab=generator.tokenizer.vocab_size,
                  text_length=96, layout_detail=1, layout_colour=True, text_rotary=True)
    model = MaskGitTransformer(MuseConfig(layout="bench", layout_skip=True, layout_reach=2,
                                          layout_skip_hidden=768, layout_shapes=True,
                                          dim=192, heads=6,
                                          text_dim=192, **config)).eval()
    layouts = LayoutDrawer(MaskGitTransformer(MuseConfig(layout_model=True, dim=128, heads=4,
                                                         text_dim=128, **config)).eval(),
                           generator.tokenizer)
    return MuseGenerator(model, generator.vqgan, generator.tokenizer, layouts=layouts)


@pytest.mark.parametrize("steps", [8, 12])
@pytest.mark.parametrize("batch", [1, 32])
def bench_painter_generation(benchmark, record, painter, batch, steps):
    benchmark.group = "generation: Muse painter on drawn layouts, 32 px, no guidance (images/s)"
    _bench_cpu(benchmark, record, painter, batch, steps, None)


@pytest.fixture(scope="module")
def generator_cuda(generator):
    gen = MuseGenerator(generator.model.cuda(), generator.vqgan.cuda(), generator.tokenizer)
    gen.synchronize = True  # the shares below are the GPU's time, not the launches'
    yield gen
    generator.model.cpu(), generator.vqgan.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("steps", [8, 12, 24])
@pytest.mark.parametrize("batch", [1, 32])
def bench_generation_cuda(benchmark, record, generator_cuda, batch, steps):
    """The same decoding on a GPU: the Triton kernels (sampling, re-masking, attention)
    against the reference paths; noise drawn on the GPU."""
    gen = generator_cuda
    benchmark.group = "generation: Muse base, 32 px, CFG 3, CUDA (images/s)"
    ours = _with_backend("triton", lambda: _run(gen, batch, steps))
    ref = _with_backend("reference", lambda: _run(gen, batch, steps))
    first = ours()
    assert torch.equal(first.tokens, ours().tokens)  # gate: seeded decoding repeats itself
    gen.synchronize = False  # throughput with the launch queue free
    t_ours, t_ref = interleaved_medians(ours, ref, rounds=5, device="cuda")
    benchmark.pedantic(lambda: (ours(), torch.cuda.synchronize()), rounds=5, iterations=1)
    gen.synchronize = True
    _record(record, gen, ours, batch, t_ours, t_ref, "cuda")
