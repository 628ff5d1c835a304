"""Ahead-of-time compile of every Triton specialisation the library launches, for A100
(sm_80) and H100 (sm_90), on a machine with no GPU.

    python -m t2i_kernels.aot [--arch 80 90] [--only vq] [--match TEXT] [--sass DIR]

Each kernel module's `aot_launches()` runs its real launchers on CPU tensors while
`t2i_kernels._launch` records the launches instead of running them; the JIT's own
specialiser turns each recorded argument list into the signature, constants and alignment
attributes a GPU launch would compile. Each is compiled with `triton.compile` for both
targets, `ptxas -v` reports registers, spills and shared memory, and the SASS is searched
for tensor-core instructions (HMMA on sm_80; HMMA or HGMMA on sm_90).

Exit status 1 if anything fails to compile, spills, or has a tl.dot that did not become
tensor-core instructions.
"""

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from t2i_kernels import attention, cross_entropy, sampling, vq
from t2i_kernels._launch import recording  # noqa: F401 (re-exported for tools)

FAMILIES = {"vq": vq, "attention": attention, "sampling": sampling,
            "cross_entropy": cross_entropy}
ARCHS = (80, 90)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    family: str
    label: str
    kernel: object
    args: tuple
    kwargs: dict


@dataclass
class Report:
    launch: Launch
    arch: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    tensor_core_ops: int = 0
    has_dot: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_bytes == 0
                and (self.tensor_core_ops > 0 or not self.has_dot))


def record_launches(families) -> list[Launch]:
    launches = []
    for family in families:
        for label, run in FAMILIES[family].aot_launches():
            def record(kernel, grid, args, kwargs, label=label, family=family):
                launches.append(Launch(family, label, kernel, args, kwargs))

            with recording(record):
                run()
    return launches


def specialise(launch: Launch, arch: int):
    """-> (ASTSource, options) exactly as the JIT would build them for these arguments."""
    kernel = launch.kernel
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    values = dict(zip(kernel.arg_names, launch.args, strict=False))
    values.update({k: v for k, v in launch.kwargs.items() if k not in _OPTIONS})
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(backend, value, param.is_const,
                                          not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an integer equal to 1 becomes a constant
            signature[param.name], constants[param.name] = "constexpr", spec
        else:
            signature[param.name] = ty
            if spec:
                attrs[(i,)] = backend.parse_attr(spec)
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTIONS}
    return ASTSource(kernel, signature, constants, attrs), options


def _ptxas_report(ptx: str, arch_name: str) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([os.path.join(_BIN, "ptxas"), "-v", f"--gpu-name={arch_name}",
                              path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout


def compile_one(launch: Launch, arch: int, sass_dir: str | None = None) -> Report:
    report = Report(launch, arch)
    try:
        src, options = specialise(launch, arch)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        arch_name = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        report.registers, report.spill_bytes = _ptxas_report(ptx, arch_name)
        report.shared_bytes = compiled.metadata.shared
        report.has_dot = "tt.dot" in compiled.asm["ttir"]
        sass = _sass(compiled.asm["cubin"])
        report.tensor_core_ops = len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass))
        if sass_dir:
            name = re.sub(r"[^\w.=+-]+", "_", f"{launch.family}_{launch.label}_sm{arch}")
            with open(os.path.join(sass_dir, name + ".sass"), "w") as f:
                f.write(sass)
    except Exception as e:  # noqa: BLE001 - every failure is reported and fails the run
        report.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    return report


_TASKS: list[tuple[Launch, int, str | None]] = []  # inherited by forked workers


def _compile_task(i: int) -> Report:
    report = compile_one(*_TASKS[i])
    report.launch = None  # kernel objects do not cross processes; the parent re-attaches
    return report


def compile_all(launches: list[Launch], archs, sass_dir=None, jobs: int = 1) -> list[Report]:
    """Compile every (launch, arch); in `jobs` forked processes (no GPU, no CUDA state)."""
    global _TASKS
    _TASKS = [(launch, arch, sass_dir) for launch in launches for arch in archs]
    if jobs <= 1:
        return [compile_one(*task) for task in _TASKS]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        reports = pool.map(_compile_task, range(len(_TASKS)), chunksize=1)
    for report, (launch, _, _) in zip(reports, _TASKS, strict=True):
        report.launch = launch
    return reports


def table(reports: list[Report]) -> str:
    rows = ["| kernel | specialisation | arch | warps | registers | spills (B) | shared (B) "
            "| tensor-core ops | status |",
            "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in reports:
        status = "ok" if r.ok else (r.error or ("SPILLS" if r.spill_bytes else "NO TENSOR CORES"))
        rows.append(f"| {r.launch.kernel.__name__} | {r.launch.label} | sm_{r.arch} | "
                    f"{r.launch.kwargs.get('num_warps', 4)} | {r.registers} | {r.spill_bytes} | "
                    f"{r.shared_bytes} | {r.tensor_core_ops} | {status} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--match", help="only specialisations whose label contains this")
    parser.add_argument("--sass", metavar="DIR", help="also write each kernel's SASS here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces compilation")
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    launches = [launch for launch in record_launches(args.only)
                if args.match is None or args.match in launch.label]
    if not launches:
        parser.error(f"no specialisation matches {args.match!r}")
    reports = compile_all(launches, args.arch, args.sass, args.jobs)
    print(table(reports))
    failed = [r for r in reports if not r.ok]
    print(f"\n{len(reports) - len(failed)} of {len(reports)} specialisations compiled "
          f"without spills{' and with tensor cores' if any(r.has_dot for r in reports) else ''}.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
