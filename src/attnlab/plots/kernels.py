"""Figure: attention latency against context length, from the kernel benchmark table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

LABELS = {
    "sdpa_flash": "SDPA flash (dense)",
    "sdpa_cudnn": "SDPA cuDNN (dense)",
    "sdpa": "SDPA (dense)",
    "flex_causal": "flex causal (dense)",
    "cab_predictor": "CAB predictor",
    "cab_predictor_torch": "CAB predictor, PyTorch",
}


def read_rows(table: str | Path) -> list[dict]:
    """Rows of a benchmark table, .csv or .parquet, with numbers as floats."""
    table = Path(table)
    if table.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(table).to_pylist()
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("n", "ms", "sparsity_target", "density", "heads", "head_dim", "batch"):
            if key in row:
                row[key] = float(row[key]) if row[key] not in ("", None) else math.nan
    return rows


def _int(value) -> str:
    return "?" if value is None or value != value else str(int(float(value)))


def _label(method: str) -> str:
    form = ""
    if method.startswith("cab_causal_"):  # the causal selection form's rows
        method, form = "cab_" + method.removeprefix("cab_causal_"), ", causal form"
    if method.startswith("cab_e2e_s"):
        return f"CAB end to end, {method.removeprefix('cab_e2e_s')}% sparse{form}"
    if method.startswith("cab_flex_s"):
        return f"CAB flex kernel alone, {method.removeprefix('cab_flex_s')}% sparse{form}"
    return LABELS.get(method, method) + form


def plot_kernel_speed(table: str | Path, out: str | Path) -> Path:
    """Latency (ms, median) against context length, log-log, one line per method.

    Reads only the benchmark table (``attnlab bench kernels``); failed runs
    (NaN latency) are left out. Dense methods are solid, CAB end to end dashed, CAB's
    parts dotted; colours step through viridis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(table) if r["ms"] == r["ms"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.cm.viridis([i / max(1, len(methods) - 1) for i in range(len(methods))])
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for method, colour in zip(methods, colours, strict=True):
        pts = sorted((r["n"], r["ms"]) for r in rows if r["method"] == method)
        style = "-" if not method.startswith("cab") else "--" if "e2e" in method else ":"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            style,
            marker="o",
            ms=4,
            color=colour,
            label=_label(method),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["n"] for r in rows})
    ax.set_xticks(lengths, [f"{int(n) // 1024}k" if n >= 1024 else str(int(n)) for n in lengths])
    ax.set_xlabel("context length N (tokens)")
    ax.set_ylabel("latency, median (ms)")
    first = rows[0] if rows else {}
    shape = ", ".join(
        f"{key}={_int(first.get(col))}"
        for key, col in (("B", "batch"), ("H", "heads"), ("D", "head_dim"))
    )
    where = first.get("gpu") or first.get("device", "")
    ax.set_title(
        f"Causal attention forward on {where}: {shape}, {first.get('dtype', '')}", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    tmp.replace(out)
    return out
