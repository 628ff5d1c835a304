"""Tiny runs of every tokenizer through the training loop: outputs, exact resume, atomic
checkpoints, non-finite losses, SIGTERM, two processes under the DeepSpeed launcher."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from t2i.training import checkpoint
from t2i.training.config import ConfigError
from t2i.training.loop import Trainer, autocast_dtype, cpu_has_bf16
from tests.training.conftest import REPO, clean_env, tiny_config, tiny_overrides, train_command

FAMILIES = ["vqgan", "dvae", "vqseg", "probe"]


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_run_leaves_a_complete_run_directory(family, synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "run")
    metrics = Trainer(tiny_config(family, synth_dir, out), ds_config(2)).train()
    assert set(os.listdir(out)) >= {"checkpoints", "export", "samples", "tb", "metrics.jsonl",
                                    "config.yaml", "ds_config.json", "eval.json"}
    rows = _rows(out)
    assert [r["step"] for r in rows if "loss/model" in r] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss/model"])) for r in rows if "loss/model" in r)
    assert metrics and all(k in rows[-1] for k in (f"val/{k}" for k in metrics))
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["step_000002.png",
                                                                "step_000004.png"]
    assert checkpoint.latest(os.path.join(out, "checkpoints")).endswith("step_000004")
    assert len(os.listdir(os.path.join(out, "checkpoints"))) == 3  # keep=2 + latest


@pytest.mark.slow
def test_export_loads_without_deepspeed(synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_config("vqgan", synth_dir, out, steps=2), ds_config(2))
    trainer.train()
    images = trainer.val_batches[0]["image"]
    expected = trainer.inference_model()(images)[0]
    torch.save(images, tmp_path / "images.pt")
    # a fresh interpreter in which importing deepspeed fails
    code = f"""
import sys, torch
sys.modules["deepspeed"] = None
from t2i.models.vqgan import VQGAN
from t2i.data import load_tokenizer
model = VQGAN.from_pretrained({out!r})
ids = model.encode(torch.load({str(tmp_path / 'images.pt')!r}))
assert ids.shape == (4, 8, 8) and ids.max() < 16, ids.shape
torch.save(model(torch.load({str(tmp_path / 'images.pt')!r}))[0], {str(tmp_path / 'out.pt')!r})
assert load_tokenizer({out + '/export'!r}).encode("a red circle")[0][0] == 1
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=clean_env())
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_a_group_of_one_does_not_build_deepspeeds_shared_memory_op():
    """The op is a ~30 s C++ compile on a fresh CPU machine, of use only across processes."""
    code = """
from deepspeed.accelerator import get_accelerator
import torch.distributed as dist
accelerator = get_accelerator()
make = accelerator.create_op_builder
def refuse(name):
    assert name != "ShareMemCommBuilder", "the shared-memory op was built"
    return make(name)
accelerator.create_op_builder = refuse
from t2i.training.loop import setup_distributed
setup_distributed()
assert dist.get_world_size() == 1
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=clean_env())


def _weights(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "export", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("family, stage", [("vqgan", 2), ("dvae", 1)])
def test_resume_is_bit_identical(family, stage, synth_dir, ds_config, tmp_path):
    """6 steps in one go == 2 steps, stop, resume, 4 more (fp32, CPU): weights, EMA,
    discriminator, optimiser, schedule, RNG and data position all carried over."""
    extra = {"ema": 0.9, "ckpt_every": 100}
    whole = str(tmp_path / "whole")
    Trainer(tiny_config(family, synth_dir, whole, steps=6, **extra), ds_config(stage)).train()

    split = str(tmp_path / "split")
    first = Trainer(tiny_config(family, synth_dir, split, steps=6, **extra), ds_config(stage))
    first.train(stop_at=2)
    second = Trainer(tiny_config(family, synth_dir, split, steps=6, **extra), ds_config(stage))
    assert second.step == 2
    second.train()

    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if family == "vqgan":  # the discriminator (not exported) too
        last = checkpoint.latest(os.path.join(whole, "checkpoints"))
        other = checkpoint.latest(os.path.join(split, "checkpoints"))
        da = torch.load(os.path.join(last, "disc", "mp_rank_00_model_states.pt"),
                        weights_only=False)["module"]
        db = torch.load(os.path.join(other, "disc", "mp_rank_00_model_states.pt"),
                        weights_only=False)["module"]
        assert all(torch.equal(da[k], db[k]) for k in da)


def test_an_interrupted_checkpoint_is_never_taken_for_the_latest(synth_dir, ds_config,
                                                                 tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    trainer = Trainer(tiny_config("vqseg", synth_dir, out, steps=4), ds_config(2))
    real_save = checkpoint._atomic_save

    def dying_save(obj, path):
        if "step_000004" in path and path.endswith("trainer.pt"):
            raise KeyboardInterrupt("killed mid-write")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "_atomic_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert os.path.isdir(os.path.join(root, "step_000004"))  # half written ...
    assert not checkpoint.is_complete(os.path.join(root, "step_000004"))
    assert checkpoint.latest(root).endswith("step_000002")  # ... and not the latest
    os.remove(os.path.join(root, "latest"))  # even without the pointer
    assert checkpoint.latest(root).endswith("step_000002")
    monkeypatch.undo()
    resumed = Trainer(tiny_config("vqseg", synth_dir, out, steps=4), ds_config(2))
    assert resumed.step == 2
    resumed.train()
    assert checkpoint.latest(root).endswith("step_000004")
    assert checkpoint.is_complete(os.path.join(root, "step_000004"))


def _poison(trainer, bad_steps: set[int]):
    """Make the model's loss NaN at the given steps."""
    losses = trainer.task.losses

    def poisoned(engines, batch, step):
        for name, loss, logs in losses(engines, batch, step):
            if name == "model" and step in bad_steps:
                loss = loss * float("nan")
                bad_steps.discard(step)  # once: the retry of that step is clean
            yield name, loss, logs

    trainer.task.losses = poisoned


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_bf16(str(info))
    info.write_text("flags\t\t: fpu amx_tile amx_bf16\n")
    assert cpu_has_bf16(str(info))
    assert not cpu_has_bf16(str(tmp_path / "missing"))
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype("auto", torch.device("cuda")) is None  # GPUs: DeepSpeed's bf16


def test_run_autocast_runs_the_forward_in_bf16_and_the_step_in_fp32(synth_dir, ds_config,
                                                                   tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_config("dvae", synth_dir, out, steps=2, autocast="bf16"),
                      ds_config(2))
    losses, seen = trainer.task.losses, []

    def watched(engines, batch, step):
        for name, loss, logs in losses(engines, batch, step):
            seen.append((torch.is_autocast_enabled("cpu"), loss.dtype))
            yield name, loss, logs

    engine = trainer.engines["model"]
    backward = engine.backward

    def watched_backward(loss):
        seen.append(torch.is_autocast_enabled("cpu"))
        return backward(loss)

    trainer.task.losses, engine.backward = watched, watched_backward
    trainer.train()
    assert seen == [(True, torch.float32), False] * 2  # the backward outside autocast
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in _weights(out).values())
    with pytest.raises(ConfigError, match="run.autocast"):
        tiny_config("dvae", synth_dir, out, autocast="fp8")


def test_a_non_finite_loss_skips_the_micro_batch(synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_config("dvae", synth_dir, out, steps=4), ds_config(2))
    _poison(trainer, {1, 3})
    trainer.train()
    assert trainer.step == 4 and trainer.skipped == 2
    assert _rows(out)[-2]["skipped"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(out).values())


def test_many_non_finite_losses_in_a_row_stop_the_run_with_the_checkpoint_intact(
        synth_dir, ds_config, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(tiny_config("dvae", synth_dir, out, steps=6, max_bad_steps=3),
                      ds_config(2))
    losses = trainer.task.losses

    def nan_from_step_2(engines, batch, step):
        for name, loss, logs in losses(engines, batch, step):
            yield name, loss * float("nan") if step >= 2 else loss, logs

    trainer.task.losses = nan_from_step_2
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 2"):
        trainer.train()
    root = os.path.join(out, "checkpoints")
    assert checkpoint.latest(root).endswith("step_000002")
    assert all(torch.isfinite(v).all() for v in _weights(out).values())


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exiting(synth_dir, tmp_path, ds_config):
    out = str(tmp_path / "run")
    args = ["--config", os.path.join(REPO, "training", "configs", "vqgan_shapes.yaml"),
            "--deepspeed_config", ds_config(2),
            *tiny_overrides("vqgan", synth_dir, out, steps=100000, ckpt_every=100000,
                            log_every=1)]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(train_command(*args), cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env=clean_env())
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(out, "metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.5)
            assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    output = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output
    root = os.path.join(out, "checkpoints")
    latest = checkpoint.latest(root)
    assert latest is not None, output
    step = int(latest.rsplit("_", 1)[1])
    assert step >= 1 and torch.load(os.path.join(latest, "trainer.pt"),
                                    weights_only=False)["step"] == step
    assert os.path.exists(os.path.join(out, "export", "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("family, stage, bf16", [("vqgan", 2, False), ("dvae", 3, False),
                                                 ("vqseg", 1, True)])
def test_two_processes_under_the_deepspeed_launcher(family, stage, bf16, synth_dir, ds_config,
                                                    tmp_path):
    out = str(tmp_path / "run")
    args = ["--config", os.path.join(REPO, "training", "configs", f"{family}_shapes.yaml"),
            "--deepspeed_config", ds_config(stage, bf16),
            *tiny_overrides(family, synth_dir, out, steps=4)]
    result = subprocess.run(train_command(*args, processes=2), cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    latest = checkpoint.latest(os.path.join(out, "checkpoints"))
    assert sorted(n for n in os.listdir(latest) if n.startswith("rank")) == [
        "rank00000.pt", "rank00001.pt"]
    rows = _rows(out)
    assert rows[-1]["step"] == 4 and any("val/" in k for k in rows[-1])
    # the two ranks read different samples: their data positions differ
    positions = [torch.load(os.path.join(latest, f"rank0000{r}.pt"), weights_only=False)["data"]
                 for r in (0, 1)]
    assert positions[0]["readers"].keys() != positions[1]["readers"].keys()
    assert all(torch.isfinite(v.float()).all() for v in _weights(out).values())


def test_zero3_trains_the_vqgan_without_a_discriminator_and_refuses_it_with_one(
        synth_dir, ds_config, tmp_path):
    plain = tiny_config("vqgan", synth_dir, str(tmp_path / "plain"), steps=2)
    plain.model.update(disc_weight=0.0, perceptual="none")
    Trainer(plain, ds_config(3)).train()
    assert checkpoint.latest(str(tmp_path / "plain" / "checkpoints")).endswith("step_000002")
    with pytest.raises(ConfigError, match="use ZeRO 1 or 2"):
        Trainer(tiny_config("vqgan", synth_dir, str(tmp_path / "gan")), ds_config(3))


def test_resume_without_a_checkpoint_is_a_config_error(synth_dir, ds_config, tmp_path):
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        Trainer(tiny_config("vqseg", synth_dir, str(tmp_path / "run")), ds_config(2),
                resume=True)
