"""Render pytest-benchmark JSON into a markdown table (and a PNG plot of the figures).

    python -m benchmarks.report benchmarks/results/cpu.json [--plot benchmarks/results/cpu.png]

One table per benchmark group: median and interquartile range of the wall time, and every
figure the benchmark recorded (throughput, ratios against alternatives measured in the same
run, peak memory).
"""

import argparse
import json
from collections import defaultdict


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def tables(data: dict) -> str:
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["fullname"].split("::")[0]].append(bench)
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores; "
             f"python {machine.get('python_version', '?')}; {data.get('datetime', '')}", ""]
    for group, benches in groups.items():
        extra = sorted({k for b in benches for k in b.get("extra_info", {})})
        lines += [f"### {group}", "",
                  "| case | median ms | IQR ms | " + " | ".join(extra) + " |",
                  "|---|---:|---:|" + "---:|" * len(extra)]
        for b in benches:
            s = b["stats"]
            cells = [_fmt(b.get("extra_info", {}).get(k, "")) for k in extra]
            case = b["name"].split("[", 1)[-1].rstrip("]") if "[" in b["name"] else b["name"]
            lines.append(f"| {case} | {s['median'] * 1e3:.2f} | {s['iqr'] * 1e3:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    """One bar chart per recorded figure, cases on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = defaultdict(list)
    for b in data["benchmarks"]:
        for k, v in b.get("extra_info", {}).items():
            if isinstance(v, (int, float)):
                figures[k].append((b["name"].replace("bench_", ""), v))
    if not figures:
        return
    fig, axes = plt.subplots(len(figures), 1, figsize=(10, 3 * len(figures)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], sorted(figures.items()), strict=True):
        ax.barh([r[0] for r in rows], [r[1] for r in rows])
        ax.set_title(name)
        if name.endswith("_ratio") or name.startswith("x_"):
            ax.axvline(1.0, color="k", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--plot", help="also write a PNG plot of the recorded figures here")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(tables(data))
    if args.plot:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
