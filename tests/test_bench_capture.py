"""The capture benchmark runs on the real model and writes its table and figure."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl


def test_bench_capture_writes_both_methods_with_equal_metrics(tmp_path):
    attnlab = Path(sys.executable).parent / "attnlab"
    proc = subprocess.run(
        [
            str(attnlab),
            "bench",
            "capture",
            "--models",
            "smollm2-135m",
            "--chunks",
            "2",
            "--chunk-len",
            "48",
            "--batch-size",
            "1",
            "--repeats",
            "2",
            "--threads",
            "2",
            "--out",
            str(tmp_path),
            "--fig",
            str(tmp_path / "fig.png"),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pl.read_parquet(tmp_path / "capture.parquet")
    assert sorted(df["method"].unique()) == [
        "capture",
        "output_attentions",
        "output_attentions_last_logits",
    ]
    assert df.height == 6 and (df["tokens"] == 96).all()
    assert (df["tokens_per_s"] > 0).all()
    peak = df.group_by("method").agg(pl.col("peak_mem_mib").median())
    peak = dict(zip(peak["method"], peak["peak_mem_mib"], strict=True))
    assert peak["capture"] < peak["output_attentions"]  # full logits, every layer's weights
    assert df["max_metric_diff"][0] < 1e-4  # the two methods measure the same thing
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
