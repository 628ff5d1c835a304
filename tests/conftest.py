"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined
(it is read when `@triton.jit` runs), so it is set here, before the tests import anything."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from t2i.data.synth import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """240 scenes at 32 px: 216 training in shards of 40 (the last one short), 24 validation."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(str(out), 240, size=32, seed=7, shard_size=40, progress=False)
    return str(out)
