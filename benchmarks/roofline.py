"""Rooflines: the time each kernel should take on an A100 and an H100, from its FLOPs and
the bytes it must move, so that a GPU run can be checked against paper.

    python -m benchmarks.roofline

Peak figures (dense, no sparsity), from NVIDIA's data sheets:
A100 SXM4 80GB: TF32 156 TFLOP/s, FP16/BF16 312 TFLOP/s, HBM2e 2,039 GB/s.
H100 SXM5 80GB: TF32 494.7 TFLOP/s, FP16/BF16 989.4 TFLOP/s, HBM3 3,350 GB/s.
fp32 inputs run as tf32x3 (three TF32 products per multiply-add): a third of TF32 peak.
"""

GPUS = {
    "A100": {"tf32": 156e12, "fp16": 312e12, "bf16": 312e12, "hbm": 2.039e12},
    "H100": {"tf32": 494.7e12, "fp16": 989.4e12, "bf16": 989.4e12, "hbm": 3.35e12},
}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def tensor_peak(gpu: str, dtype: str) -> float:
    return GPUS[gpu]["tf32"] / 3 if dtype == "fp32" else GPUS[gpu][dtype]


def _row(kernel: str, shape: str, flops: float, hbm: float, dtype: str) -> dict:
    """The time each GPU needs: the larger of compute (tensor peak) and HBM traffic."""
    out = {"kernel": kernel, "shape": shape, "gflop": flops / 1e9, "hbm_mb": hbm / 1e6}
    for gpu in GPUS:
        compute = flops / tensor_peak(gpu, dtype) if flops else 0.0
        memory = hbm / GPUS[gpu]["hbm"]
        out[f"{gpu}_us"] = max(compute, memory) * 1e6
        out[f"{gpu}_bound"] = "compute" if compute > memory else "memory"
    return out


def vq_lookup(n: int, d: int, k: int, dtype: str) -> dict:
    """FLOPs: the N x K x D multiply-adds. Bytes from HBM: z and quantized once, the
    codebook once (it then stays in L2), indices and distances."""
    e = BYTES[dtype]
    flops = 2 * n * k * d
    hbm = n * d * e * 2 + k * d * e + n * 8 + n * 4
    return _row("vq_lookup", f"N={n} D={d} K={k} {dtype}", flops, hbm, dtype)


def sample_logits(b: int, v: int, dtype: str, cfg: bool = False) -> dict:
    """Memory-bound: the floor is reading the logits (twice that with CFG) once from HBM.
    The kernel's threshold searches re-read each row from L2 (<= ~70 passes with top-k and
    top-p), which this floor does not count."""
    hbm = b * v * BYTES[dtype] * (2 if cfg else 1) + b * 12
    return _row("sample_logits", f"B={b} V={v} {dtype}{' cfg' if cfg else ''}", 0, hbm, dtype)


def linear_cross_entropy(n: int, c: int, v: int, dtype: str) -> dict:
    """Forward + backward: three N x C x V GEMMs; HBM: hidden, weight and their gradients,
    plus each chunk of logits written and read twice (it does not stay in L2 at this size)."""
    e = BYTES[dtype]
    flops = 3 * 2 * n * c * v
    hbm = 2 * (n * c + v * c) * e + 3 * n * v * e
    return _row("linear_cross_entropy", f"N={n} C={c} V={v} {dtype}", flops, hbm, dtype)


def attention(b: int, h: int, n: int, d: int, prefix: int | None, dtype: str,
              block_m: int = 64, block_n: int = 32, backward: bool = False) -> dict:
    """FLOPs over the tiles the kernel visits (a causal/prefix rule bounds each query block's
    key loop): 4 * rows * keys * D forward (QK^T and PV); backward recomputes QK^T and adds
    dV, dP, dS and dQ/dK: 2.5x forward (FlashAttention-2's count). HBM: q, k, v, out once
    (+ dout, dq, dk, dv for backward)."""
    e = BYTES[dtype]
    pairs = 0
    for m0 in range(0, n, block_m):
        last = min(n, m0 + block_m) - 1
        hi = n if prefix is None else min(n, max(last, prefix - 1) + 1)
        pairs += (min(n, m0 + block_m) - m0) * (-(-hi // block_n) * block_n)
    flops = 4 * b * h * pairs * d * (3.5 if backward else 1.0)
    hbm = b * h * n * d * e * (8 if backward else 4)
    kind = "dense" if prefix is None else "causal" if prefix == 0 else f"prefix {prefix}"
    return _row("masked_attention" + (" fwd+bwd" if backward else " fwd"),
                f"B={b} H={h} L={n} Dh={d} {kind} {dtype}", flops, hbm, dtype)


ROWS = [vq_lookup(16384, 64, 8192, t) for t in ("fp32", "fp16", "bf16")] + [
    vq_lookup(4096, 256, 1024, "bf16"), vq_lookup(65536, 32, 512, "bf16"),
    sample_logits(256, 8192, "fp32"), sample_logits(256, 8192, "bf16"),
    sample_logits(256, 8192, "bf16", cfg=True),
    linear_cross_entropy(8192, 512, 8192, "bf16"), linear_cross_entropy(4096, 256, 16384, "bf16"),
    attention(4, 8, 1024, 64, None, "bf16"), attention(4, 8, 1024, 64, 0, "bf16"),
    attention(4, 8, 1024, 64, 256, "bf16"), attention(4, 8, 1024, 64, 256, "bf16", backward=True)]


def table(rows=ROWS) -> str:
    lines = ["| kernel | shape | GFLOP | HBM MB | A100 µs | H100 µs | bound (H100) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['gflop']:.2f} | {r['hbm_mb']:.1f} | "
                     f"{r['A100_us']:.1f} | {r['H100_us']:.1f} | {r['H100_bound']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
