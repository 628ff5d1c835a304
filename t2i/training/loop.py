"""The training loop behind `deepspeed training/train.py` (and `python training/train.py`).

One loop for every family: the config's model.family / model.stage pick a Task from the
registry (t2i.models); each of the task's modules gets a torch AdamW, a warm-up + cosine
LR schedule and a DeepSpeed engine (ZeRO stage, precision, micro-batch, accumulation and
clipping come from the DeepSpeed JSON). Per micro-batch the task yields one loss per
module, in order; each is checked (a non-finite loss on any rank skips the micro-batch on
every rank), back-propagated and stepped by its engine.

The run directory:
    checkpoints/      DeepSpeed checkpoints + RNG and data position (t2i.training.checkpoint)
    export/           model.safetensors (fp32; EMA weights when run.ema > 0) + config.json +
                      tokenizer, refreshed with every checkpoint: loads without DeepSpeed
    samples/          step_XXXXXX.png grids of validation batches
    metrics.jsonl     one JSON row per log interval, plus evaluations
    tb/               TensorBoard event files
    config.yaml       the resolved configuration; ds_config.json, DeepSpeed's
"""

import dataclasses
import importlib
import json
import logging
import math
import os
import signal
import socket
import time

import torch
import torch.distributed as dist
import yaml

from t2i.data import (
    BPETokenizer,
    ByteTokenizer,
    ImageTextPipeline,
    captions,
    ensure_synth,
    load_tokenizer,
)
from t2i.data.tokenizer import FILENAME as TOKENIZER_FILE
from t2i.images import save_grid
from t2i.models import get_family, save_pretrained
from t2i.training import checkpoint
from t2i.training.config import ConfigError, TrainConfig, from_dict

log = logging.getLogger("t2i.train")


def env_without_group() -> dict[str, str]:
    """This process's environment without the process-group variables (a launcher's, or
    those `setup_distributed` sets): a child process given it forms a group of its own."""
    group = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in group}


def setup_distributed() -> None:
    """Join (or, for a plain `python` run, create) the process group: gloo on CPU."""
    if dist.is_initialized():
        return
    import deepspeed

    if "RANK" not in os.environ:  # not started by a launcher: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ["WORLD_SIZE"] == "1":
        # DeepSpeed's CPU process groups build its shared-memory all-reduce op first, a C++
        # compile of ~30 s on 2 cores (on a fresh machine, and again whenever the
        # environment changes); a group of one never reduces across processes. (Imported by
        # name: the package's attribute `torch` is torch itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def lr_factor(step: int, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then constant or cosine down to min_ratio at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bf16 dot products natively (avx512_bf16 or amx_bf16 among
    its flags; False where /proc/cpuinfo is missing): bf16 matrix products are then ~2x
    faster than fp32 ones, and without them slower."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """run.autocast -> the dtype forward passes run in under torch.autocast (None: off)."""
    if mode == "bf16" or (mode == "auto" and device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return None


def full_state(engine) -> dict[str, torch.Tensor]:
    """The engine's module state, gathered whole under ZeRO-3, as fp32 CPU copies.
    Collective under ZeRO-3 (every rank must call it)."""
    import deepspeed

    module = engine.module

    def copy():
        return {k: v.detach().float().cpu().clone() if v.is_floating_point()
                else v.detach().cpu().clone() for k, v in module.state_dict().items()}

    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, state: dict[str, torch.Tensor], param_names: set[str], decay: float):
        self.decay = decay
        self.params = param_names
        self.state = {k: v.clone() for k, v in state.items()}

    def update(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if k in self.params:
                self.state[k].lerp_(v, 1 - self.decay)
            else:
                self.state[k].copy_(v)


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signal = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """>>> Trainer(config, "training/configs/ds_zero2.json").train()"""

    def __init__(self, config: TrainConfig, ds_config: dict | str, resume: bool | None = None):
        self.config = config
        run, data = config.run, config.data
        if isinstance(ds_config, str):
            with open(ds_config, encoding="utf-8") as f:
                ds_config = json.load(f)
        self.ds_config = ds_config
        family = get_family(config.model["family"])
        stage = config.model["stage"]
        if stage not in family.STAGES:
            raise ConfigError(f"model.stage: {config.model['family']} has stages "
                              f"{', '.join(family.STAGES)}, not {stage!r}")
        model_keys = {k: v for k, v in config.model.items() if k not in ("family", "stage")}
        model_config = from_dict(family.CONFIG, model_keys, "model")

        setup_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
                                   if torch.cuda.is_available() else "cpu")
        self.autocast = autocast_dtype(run.autocast, self.device)
        if self.rank == 0 and not os.path.exists(data.path):
            ensure_synth(data.path, data.synth_if_missing, size=data.image_size,
                         held_out_train=data.synth_held_out)
        dist.barrier()
        self.tokenizer = self._text_tokenizer(data, run.out)
        torch.manual_seed(run.seed)  # the same initial weights on every rank
        self.task = family.STAGES[stage](model_config, data, self.tokenizer)
        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if zero_stage == 3 and not self.task.zero3_ok:
            raise ConfigError(f"{config.model['family']} with these settings calls a module "
                              f"outside its engine (a frozen discriminator in the generator's "
                              f"loss), which ZeRO-3 does not allow: use ZeRO 1 or 2 "
                              f"(ds_zero2.json), or a config without the discriminator")
        self.engines = {}
        for name, module in self.task.modules().items():
            self.engines[name] = self._engine(module, self.task.lr_scale(name))
        model_engine = self.engines["model"]
        self.micro = model_engine.train_micro_batch_size_per_gpu()
        self.accumulation = model_engine.gradient_accumulation_steps()
        self.dtype = (torch.bfloat16 if model_engine.bfloat16_enabled() else
                      torch.float16 if model_engine.fp16_enabled() else torch.float32)

        self.pipeline = ImageTextPipeline(
            data.path, tokenizer=self.tokenizer, image_size=data.image_size,
            batch_size=self.micro, num_workers=data.workers, seed=run.seed, drop_last=True)
        val = ImageTextPipeline(data.path, tokenizer=self.tokenizer, image_size=data.image_size,
                                batch_size=self.micro, split="val", shuffle=False, rank=0,
                                world_size=1)
        self.val_batches = []
        for batch in val.epoch(0):
            if len(self.val_batches) == data.val_batches:
                break
            self.val_batches.append(batch)

        self.out = run.out
        self.ckpt_root = os.path.join(self.out, "checkpoints")
        self.step = self.epoch = self.skipped = 0
        self.data_position = None
        param_names = {n for n, _ in self.task.model.named_parameters()}
        self.ema = EMA(full_state(model_engine), param_names, run.ema) if run.ema else None
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), f,
                               sort_keys=False)
            with open(os.path.join(self.out, "ds_config.json"), "w", encoding="utf-8") as f:
                json.dump(ds_config, f, indent=2)
        found = checkpoint.latest(self.ckpt_root)
        if resume is None:
            resume = found is not None
        if resume:
            if found is None:
                raise ConfigError(f"--resume: no complete checkpoint in {self.ckpt_root}")
            self._load(found)
        else:  # training randomness differs between ranks (a resumed run restores its own)
            torch.manual_seed(run.seed * 1000 + self.rank + 1)

    # ------------------------------------------------------------------ setup helpers

    def _text_tokenizer(self, data, out: str):
        """"byte"; "bpe": trained on the training captions at the run's first start and
        kept in the run directory (so a resumed run reads the same ids); or a folder."""
        if data.tokenizer == "byte":
            return ByteTokenizer(data.text_length)
        if data.tokenizer != "bpe":
            return load_tokenizer(data.tokenizer)
        if self.rank == 0 and not os.path.exists(os.path.join(out, TOKENIZER_FILE)):
            tok = BPETokenizer.train(captions(data.path), data.bpe_vocab, data.text_length)
            tok.save(out)
            log.info("trained a %d-token BPE tokenizer on the training captions",
                     tok.vocab_size)
        dist.barrier()
        return load_tokenizer(out)

    def _engine(self, module, lr_scale: float):
        import deepspeed

        run = self.config.run
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=run.lr * lr_scale, betas=run.betas,
                                      weight_decay=run.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, run.steps, run.warmup, run.schedule, run.min_lr_ratio))
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                               lr_scheduler=schedule, config=self.ds_config,
                                               dist_init_required=False)
        return engine

    def _load(self, path: str) -> None:
        rank_state, state = checkpoint.load(path, self.engines)
        checkpoint.set_rng_state(rank_state["rng"])
        self.data_position = rank_state["data"]
        self.step, self.epoch, self.skipped = state["step"], state["epoch"], state["skipped"]
        if self.ema is not None:
            if state.get("ema") is None:
                raise RuntimeError(f"{path} has no EMA weights but run.ema is set")
            self.ema.state = state["ema"]
        if self.rank == 0:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop

    def _to_device(self, batch: dict, dtype: torch.dtype | None = None) -> dict:
        """Tensors to the device; floating ones to `dtype` (default: the engines')."""
        dtype = dtype or self.dtype
        return {k: (v.to(self.device, dtype if v.is_floating_point() else v.dtype)
                    if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def forward_autocast(self):
        """The context a task's forward pass runs in: torch.autocast at `run.autocast`'s
        dtype, or a disabled one when that is off."""
        return torch.autocast(self.device.type, self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)

    def _micro_step(self, batch: dict) -> dict[str, float] | None:
        """Train on one micro-batch; None when a loss was not finite (skipped)."""
        logs = {}
        losses = self.task.losses(self.engines, batch, self.step)
        while True:
            with self.forward_autocast():  # the forward only
                item = next(losses, None)
            if item is None:
                break
            name, loss, loss_logs = item
            if self._any(not bool(torch.isfinite(loss.detach()).all())):
                return None
            engine = self.engines[name]
            engine.backward(loss)
            engine.step()
            logs[f"loss/{name}"] = loss.item()
            logs.update(loss_logs)
        return logs

    def _good_micro_step(self, batches) -> dict[str, float]:
        """Train on the next micro-batch whose losses are finite, skipping (and counting)
        the others; too many in a row stop the run."""
        for bad_in_row in range(1, self.config.run.max_bad_steps + 1):
            logs = self._micro_step(self._to_device(next(batches)))
            if logs is not None:
                return logs
            self.skipped += 1
            if self.rank == 0:
                log.warning("step %d: non-finite loss, micro-batch skipped (%d in a row, %d "
                            "in all)", self.step, bad_in_row, self.skipped)
        raise FloatingPointError(
            f"{bad_in_row} non-finite losses in a row at step {self.step}: stopping. The "
            f"last good checkpoint is {checkpoint.latest(self.ckpt_root)}; lower run.lr or "
            f"check the data")

    def _batches(self):
        """Micro-batches forever, epoch after epoch, from the resumed position; every rank
        ends an epoch when any rank runs out (ranks may differ by one batch)."""
        while True:
            it = iter(self.pipeline.epoch(self.epoch, resume=self.data_position))
            self.data_position = None
            while True:
                batch = next(it, None)
                if self._any(batch is None):
                    break
                yield batch
            self.epoch += 1

    def train(self, stop_at: int | None = None, on_step=None) -> dict[str, float]:
        """Run to config.run.steps (or stop, checkpointed, at step `stop_at`, as an
        interrupted run would); returns the final validation metrics. `on_step`: called
        after every step (train.py: a prerequisite training beside this run has ended)."""
        run = self.config.run
        stop = _StopRequest()
        writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(self.out, "tb"))
        progress = None
        if self.rank == 0 and run.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=run.steps, initial=self.step, unit="step", dynamic_ncols=True)
        batches = self._batches()
        sums: dict[str, float] = {}
        count, tick = 0, time.perf_counter()
        metrics = None
        samples_per_step = self.micro * self.accumulation * self.world
        try:
            while self.step < run.steps:
                for _ in range(self.accumulation):
                    for k, v in self._good_micro_step(batches).items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                self.step += 1
                if on_step is not None:
                    on_step()
                if self.ema is not None:
                    self.ema.update(full_state(self.engines["model"]))
                if progress is not None:
                    progress.update(1)
                if self.step % run.log_every == 0 or self.step == run.steps:
                    now = time.perf_counter()
                    row = {k: v / count for k, v in sums.items()}
                    row["samples_per_s"] = samples_per_step * run.log_every / (now - tick) \
                        if self.step % run.log_every == 0 else float("nan")
                    row["lr"] = self.engines["model"].get_lr()[0]
                    row["skipped"] = self.skipped
                    self._log(writer, row)
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss/model']:.4f}",
                                             samples_s=f"{row['samples_per_s']:.1f}")
                    sums, count, tick = {}, 0, now
                if self.step % run.sample_every == 0:
                    self._samples()
                stopping = self._any(bool(stop.signal))
                if self.step % run.ckpt_every == 0 or self.step in (run.steps, stop_at) \
                        or stopping:
                    model = self.inference_model()  # gathered once for export and eval
                    self.save(model)
                    metrics = self.evaluate(model)
                if stopping:
                    raise SystemExit(128 + (stop.signal or signal.SIGTERM))
                if self.step == stop_at:
                    return metrics
            if self.step % run.sample_every:
                self._samples()
            return metrics if metrics is not None else self.evaluate()
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()

    # ------------------------------------------------------------------ outputs

    def _log(self, writer, row: dict) -> None:
        if self.rank != 0:
            return
        row = {"step": self.step, **row}
        with open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, self.step)

    def inference_model(self):
        """A plain fp32 copy of the model (EMA weights when kept) for samples, evaluation
        and export. Collective under ZeRO-3."""
        state = self.ema.state if self.ema is not None else full_state(self.engines["model"])
        with torch.random.fork_rng(devices=[]):  # its random init must not shift training's RNG
            model = type(self.task.model)(self.task.model.config)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    def _samples(self, model=None) -> None:
        model = model if model is not None else self.inference_model()
        if self.rank == 0 and self.val_batches:
            batch = self._to_device(self.val_batches[0], torch.float32)
            rows = self.task.samples(model, batch)
            save_grid(rows, os.path.join(self.out, "samples", f"{checkpoint.step_name(self.step)}"
                                         ".png"), scale=2)

    def evaluate(self, model=None) -> dict[str, float]:
        """Validation metrics of the inference model (rank 0 computes; all return them)."""
        model = model if model is not None else self.inference_model()
        metrics = {}
        if self.rank == 0:
            batches = [self._to_device(b, torch.float32) for b in self.val_batches]
            metrics = self.task.evaluate(model, batches)
            self._log(None, {f"val/{k}": v for k, v in metrics.items()})
            with open(os.path.join(self.out, "eval.json"), "w", encoding="utf-8") as f:
                json.dump({"step": self.step, **metrics}, f, indent=2)
        if self.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def export(self, model=None) -> str:
        """Write RUN/export (model.safetensors, config.json, tokenizer); returns the path."""
        model = model if model is not None else self.inference_model()
        path = os.path.join(self.out, "export")
        if self.rank == 0:
            save_pretrained(model, path, family=self.task.family, stage=self.task.stage,
                            extra={"step": self.step, "steps": self.config.run.steps,
                                   "ema": self.ema is not None,
                                   "data": dataclasses.asdict(self.config.data)})
            self.tokenizer.save(path)
            self.task.export(path)
        return path

    def refresh_outputs(self) -> None:
        """The export and sample grid again, at this step: a prerequisite that trained
        beside this run (a painter's layout model) has exported since they were written."""
        model = self.inference_model()
        self.export(model)
        self._samples(model)

    def save(self, model=None) -> str:
        """Checkpoint (collective) and refresh the export."""
        rank_state = {"rng": checkpoint.rng_state(), "data": self.pipeline.position()}
        trainer_state = {"step": self.step, "epoch": self.epoch, "skipped": self.skipped,
                         "ema": self.ema.state if self.ema is not None else None}
        path = checkpoint.save(self.ckpt_root, self.step, self.engines, rank_state,
                               trainer_state, self.config.run.keep)
        self.export(model)
        return path
