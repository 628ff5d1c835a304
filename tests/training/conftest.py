"""Tiny training runs: 16 px images, micro-batch 4, models of width 8 with 16 codes."""

import json
import os
import sys

import pytest

from t2i.training.config import load_config
from t2i.training.loop import env_without_group

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO, "training", "train.py")
CONFIGS = os.path.join(REPO, "training", "configs")

TINY_MODEL = {
    "vqgan": ["model.channels=8", "model.mults=[1,2]", "model.num_codes=16", "model.code_dim=8",
              "model.disc_channels=8", "model.disc_start=2"],
    "dvae": ["model.channels=8", "model.mults=[1,2]", "model.num_codes=16",
             "model.code_dim=8", "model.tau_anneal_steps=4", "model.kl_warmup=2"],
    "vqseg": ["model.channels=8", "model.mults=[1,2]", "model.num_codes=16",
              "model.code_dim=8"],
    "probe": ["model.channels=8", "model.mults=[1,2]", "model.features=16",
              "model.image_size=16"],
}


def tiny_overrides(family: str, data: str, out: str, steps: int = 4, **extra) -> list[str]:
    run = {"out": out, "steps": steps, "warmup": 2, "log_every": 2, "sample_every": 2,
           "ckpt_every": 2, "progress": False, **extra}
    return (TINY_MODEL[family] + [f"data.path={data}", "data.image_size=16", "data.workers=0",
                                  "data.val_batches=2"]
            + [f"run.{k}={v}" for k, v in run.items()])


def tiny_config(family: str, data: str, out: str, steps: int = 4, **extra):
    config, _ = load_config(os.path.join(CONFIGS, f"{family}_shapes.yaml"),
                            tiny_overrides(family, data, out, steps, **extra))
    return config


@pytest.fixture(scope="session")
def ds_config(tmp_path_factory):
    """DeepSpeed JSON path factory: micro-batch 4, fp32, the given ZeRO stage."""
    root = tmp_path_factory.mktemp("ds")

    def make(stage: int = 2, bf16: bool = False) -> str:
        path = root / f"zero{stage}{'_bf16' if bf16 else ''}.json"
        path.write_text(json.dumps({
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
            "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}))
        return str(path)

    return make


def train_command(*args: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, TRAIN_PY, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
            "--master_port", str(29500 + os.getpid() % 1000), TRAIN_PY, *args]


def clean_env() -> dict:
    """The environment without the process-group variables an in-process run has set."""
    return env_without_group()
