"""Data throughput: writing synthetic shards (goal: >= 2,000 images/s at 32 px on one core)
and reading them back into batches."""

import pytest

from t2i.data.pipeline import ImageTextPipeline
from t2i.data.shards import ShardIndex
from t2i.data.synth import synthesize, write_shard
from t2i.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize("size, num", [(32, 4000), (64, 2000), (128, 1000)],
                         ids=["32px", "64px", "128px"])
def bench_synth_one_core(benchmark, record, tmp_path, size, num):
    args = (str(tmp_path), "train", 0, 0, num, size, 0)
    write_shard(*args)  # correctness gate: every sample is in the shard, whole
    index = ShardIndex(str(tmp_path / "train-000000.tar"))
    assert index.error is None and len(index) == num
    assert all(set(m) == {"png", "txt", "seg.png", "json"} for _, m in index.samples)
    benchmark.group = "data: synth"
    benchmark.pedantic(write_shard, args=args, rounds=3, iterations=1)
    record(images_per_s=round(num / benchmark.stats.stats.median))


@pytest.mark.parametrize("num_workers", [0, 2], ids=["main-process", "2-workers"])
def bench_pipeline_epoch(benchmark, record, tmp_path, num_workers):
    synthesize(str(tmp_path), 4400, size=32, shard_size=1000, progress=False)
    pipe = ImageTextPipeline(str(tmp_path), tokenizer=ByteTokenizer(224), image_size=32,
                             batch_size=64, num_workers=num_workers)

    def epoch():
        return sum(len(batch["key"]) for batch in pipe.epoch(0))

    assert epoch() == 3960 and pipe.last_issues == {}  # correctness gate
    benchmark.group = "data: shards -> batches"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    record(samples_per_s=round(3960 / benchmark.stats.stats.median))
