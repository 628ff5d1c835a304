"""Training throughput of every tokenizer (two sizes) and of ZeRO 1/2/3 on one model.

A step is one micro-batch of 32 synthetic 32 px scenes through the Trainer's own step
(forward, backward, optimiser) on batches already in memory: data loading is measured by
bench_data.py (thousands of samples/s, far above these rates). Ratios are taken in one run
against the same model trained by a plain torch loop (AdamW, no DeepSpeed): the engines'
overhead. Correctness gate: the DeepSpeed step and the plain step start from the same
weights and must give the same first loss.
"""

import os

import pytest
import torch

from benchmarks._measure import default_vqgan_config, interleaved_medians, mib, peak_extra_bytes
from t2i.data.synth import synthesize
from t2i.training.config import load_config
from t2i.training.loop import Trainer
from t2i.training.task import unwrap

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "training", "configs")
SIZES = {"small": ["model.channels=32"], "base": ["model.channels=64"]}
BATCH = 32


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    synthesize(str(out), 400, size=32, shard_size=200, progress=False)
    return str(out)


def _ds(stage: int) -> dict:
    """The DeepSpeed config of every row: batch 32, one micro-batch a step, ZeRO `stage`."""
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
            "steps_per_print": 10 ** 9}


def _trainer(family: str, size: str, stage: int, scenes: str, out: str,
             gan: bool = True) -> Trainer:
    overrides = [*SIZES[size], f"data.path={scenes}", f"run.out={out}", "run.progress=false",
                 "data.workers=0", "data.val_batches=1"]
    if family == "vqgan":  # time the full GAN step, or none of it
        overrides += ["model.disc_start=0"] if gan else ["model.disc_weight=0",
                                                         "model.perceptual=none"]
    config, _ = load_config(os.path.join(CONFIGS, f"{family}_shapes.yaml"), overrides)
    return Trainer(config, _ds(stage), resume=False)


def _plain_step(trainer: Trainer):
    """The same task trained by plain torch modules and AdamW: the reference loop."""
    modules = {name: unwrap(e) for name, e in trainer.engines.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4)
                  for name, m in modules.items()}

    def step(batch):
        losses = {}
        items = trainer.task.losses(modules, batch, trainer.step)
        while True:
            with trainer.forward_autocast():  # as the Trainer does
                item = next(items, None)
            if item is None:
                break
            name, loss, _ = item
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules[name].parameters(), 1.0)
            optimizers[name].step()
            losses[name] = loss.item()
        return losses

    return step


def _measure(benchmark, trainer: Trainer, plain_trainer: Trainer) -> dict:
    """Gate (same first loss as the plain loop from the same weights), then the interleaved
    step times of both, the benchmark rows and the peak memory of one step."""
    batch = trainer._to_device(next(iter(trainer.pipeline.epoch(0))))
    plain = _plain_step(plain_trainer)
    torch.manual_seed(0)
    first = trainer._micro_step(batch)["loss/model"]
    torch.manual_seed(0)
    assert abs(plain(batch)["model"] - first) <= 1e-5 * max(1.0, abs(first))  # gate
    ours, ref = interleaved_medians(lambda: trainer._micro_step(batch), lambda: plain(batch),
                                    rounds=5)
    benchmark.pedantic(lambda: trainer._micro_step(batch), rounds=3, iterations=1)
    return {"samples_per_s": round(BATCH / ours, 1), "vs_plain_torch": round(ours / ref, 3),
            "peak_MiB": mib(peak_extra_bytes(lambda: trainer._micro_step(batch)))}


@pytest.mark.parametrize("size", ["small", "base"])
@pytest.mark.parametrize("family", ["vqgan", "dvae", "vqseg"])
def bench_tokenizer_training(benchmark, record, scenes, tmp_path, family, size):
    benchmark.group = "training: tokenizers (ZeRO-2, fp32, batch 32, 32 px)"
    trainer = _trainer(family, size, 2, scenes, str(tmp_path / "run"))
    plain = _trainer(family, size, 1, scenes, str(tmp_path / "plain"))
    params = sum(p.numel() for p in trainer.task.model.parameters())
    record(params_M=round(params / 1e6, 2), **_measure(benchmark, trainer, plain))


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])
def bench_zero_stages(benchmark, record, scenes, tmp_path, stage):
    # without the discriminator: ZeRO-3 refuses a loss that calls a module outside its engine
    benchmark.group = "training: ZeRO stages (VQGAN small, no discriminator, one process)"
    trainer = _trainer("vqgan", "small", stage, scenes, str(tmp_path / "run"), gan=False)
    # the plain loop takes the modules of a ZeRO-1 trainer: ZeRO-3 leaves them partitioned
    plain = _trainer("vqgan", "small", 1, scenes, str(tmp_path / "plain"), gan=False)
    record(**_measure(benchmark, trainer, plain))


@pytest.fixture(scope="module")
def default_vqgan(tmp_path_factory):
    """The default run's VQGAN (vqgan32_shapes.yaml), randomly initialised and exported: the
    Muse step's speed does not depend on its weights."""
    from t2i.models import save_pretrained
    from t2i.models.vqgan import VQGAN

    out = str(tmp_path_factory.mktemp("default_vqgan"))
    vqgan = VQGAN(default_vqgan_config())
    save_pretrained(vqgan, os.path.join(out, "export"), family="vqgan", stage="tokenizer")
    return out


@pytest.fixture(scope="module")
def default_layout(scenes, default_vqgan, tmp_path_factory):
    """A layout model of muse_layout_shapes.yaml trained for one step and exported: a
    painter trains on the true layouts, so its step does not depend on these weights."""
    out = str(tmp_path_factory.mktemp("default_layout"))
    config, _ = load_config(os.path.join(CONFIGS, "muse_layout_shapes.yaml"), [
        f"model.tokenizer={default_vqgan}", f"data.path={scenes}", f"run.out={out}",
        "run.steps=1", "run.progress=false", "data.workers=0", "data.val_batches=1"])
    Trainer(config, _ds(2), resume=False).train()
    return out


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def bench_muse_training(benchmark, record, scenes, default_vqgan, default_layout, tmp_path,
                        stage):
    benchmark.group = ("training: Muse painter (muse_shapes.yaml: run.autocast as configured, "
                       "batch 32, 32 px)")
    overrides = [f"model.tokenizer={default_vqgan}", f"model.layout={default_layout}",
                 f"data.path={scenes}", f"run.out={tmp_path / 'run'}", "run.progress=false",
                 "data.workers=0", "data.val_batches=1"]

    def make(out, zero):
        config, _ = load_config(os.path.join(CONFIGS, "muse_shapes.yaml"),
                                overrides + [f"run.out={out}"])
        return Trainer(config, _ds(zero), resume=False)

    trainer = make(str(tmp_path / "run"), stage)
    # the plain loop needs whole modules: under ZeRO-3 take them from a ZeRO-2 trainer
    plain = make(str(tmp_path / "plain"), min(stage, 2))
    params = sum(p.numel() for p in plain.task.model.parameters())  # whole, not partitioned
    record(params_M=round(params / 1e6, 2), **_measure(benchmark, trainer, plain))
