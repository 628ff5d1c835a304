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


def _panel(name: str) -> str:
    """Figures that compare against alternatives share a panel: ratio_*, peak_mib*."""
    for prefix in ("ratio", "peak_mib"):
        if name.startswith(prefix):
            return prefix
    return name


def plot(data: dict, path: str) -> None:
    """Grouped bars per case: one panel of time ratios (line at 1: below it we are faster),
    one of peak memory (log scale), one per other figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(dict))  # panel -> figure -> case -> value
    for b in data["benchmarks"]:
        case = b["name"].replace("bench_", "")
        for k, v in b.get("extra_info", {}).items():
            if isinstance(v, (int, float)):
                panels[_panel(k)][k][case] = v
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.2 * len(panels)), squeeze=False)
    for ax, (panel, figures) in zip(axes[:, 0], sorted(panels.items()), strict=True):
        cases = sorted({c for values in figures.values() for c in values})
        width = 0.8 / len(figures)
        for i, (name, values) in enumerate(sorted(figures.items())):
            ax.barh([j + i * width for j in range(len(cases))],
                    [values.get(c, 0) for c in cases], height=width, label=name)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8)
        ax.set_title({"ratio": "time ours / alternative (below 1: ours faster)",
                      "peak_mib": "peak memory, MiB"}.get(panel, panel))
        if panel == "ratio":
            ax.axvline(1.0, color="k", lw=0.8)
        if panel == "peak_mib":
            ax.set_xscale("symlog")
        if len(figures) > 1:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
