"""The install layout other codebases rely on."""

import importlib.metadata
import os
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    # from a neutral directory, so the checkout's folders are not on sys.path
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.expanduser("~"), check=True)
    return result.stdout.strip()


def test_kernels_import_without_t2i():
    assert _run("import sys, t2i_kernels; print('t2i' in sys.modules)") == "False"


def test_the_distribution_installs_t2i_and_t2i_kernels_and_no_package_named_kernels():
    top = importlib.metadata.distribution("t2i").read_text("top_level.txt").split()
    assert sorted(top) == ["t2i", "t2i_kernels"]
    assert _run("import importlib.util; print(importlib.util.find_spec('kernels'))") == "None"


def test_setup_never_pins_torch():
    requires = importlib.metadata.requires("t2i")
    torch_req = [r for r in requires if r.split(">")[0].split("=")[0].strip() == "torch"]
    assert torch_req and "==" not in torch_req[0]
    assert "triton==3.7.1" in requires


@pytest.mark.parametrize("value", ["bogus", "cuda"])
def test_a_bad_backend_name_is_an_error(monkeypatch, value):
    import torch

    from t2i_kernels._dispatch import choose_backend

    monkeypatch.setenv("T2I_KERNEL_BACKEND", value)
    with pytest.raises(ValueError, match="T2I_KERNEL_BACKEND"):
        choose_backend(torch.zeros(1))


def test_backend_defaults_and_forcing(monkeypatch):
    import torch

    from t2i_kernels._dispatch import choose_backend

    monkeypatch.delenv("T2I_KERNEL_BACKEND", raising=False)
    assert choose_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "reference")
    assert choose_backend(torch.zeros(1)) == "reference"
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        choose_backend(torch.zeros(1))


def test_import_t2i_is_light_and_submodules_load_on_first_use():
    assert _run("import sys, t2i; print('torch' in sys.modules)") == "False"
    assert _run("import t2i; print(callable(t2i.pipelines.load))") == "True"
