"""The accuracy-matched table: each policy's highest sparsity keeping 90% of full
attention's answers, with the speed measured for that selection, on tables of known
content."""

import math

import polars as pl

from attnlab.matched import matched, points


def _niah():
    """Ten prompts per cell at one length: full attention answers all ten; Quest 10, 9, 6
    at 90 / 95 / 99%; H2O 5 everywhere (never 90%); top-k 10 everywhere, but its 99% row
    missed its target."""
    correct = {"quest": (10, 9, 6), "h2o": (5, 5, 5), "topk": (10, 10, 10)}
    rows = [
        dict(regime="cache", policy="full", target_sparsity=0.0, correct=True, feasible=True)
        for _ in range(10)
    ]
    for policy, counts in correct.items():
        for s, n in zip((0.9, 0.95, 0.99), counts, strict=True):
            feasible = not (policy == "topk" and s == 0.99)
            rows += [
                dict(
                    regime="cache",
                    policy=policy,
                    target_sparsity=s,
                    correct=i < n,
                    feasible=feasible,
                )
                for i in range(10)
            ]
    df = pl.DataFrame(rows)
    return df.with_columns(
        length=pl.lit(4096), task=pl.lit("passkey"), achieved_sparsity=pl.col("target_sparsity")
    )


def _decode():
    rows = [
        dict(shape="m", cache=4096, policy=p, target_sparsity=s, speedup_vs_dense=x)
        for p, x in (("quest", 0.5), ("topk", 0.2), ("evicted", 3.0))
        for s in (0.9, 0.95, 0.99)
    ]
    return pl.DataFrame(rows)


def test_each_policy_keeps_its_highest_qualifying_sparsity_and_its_speed():
    got = {
        r["policy"]: r
        for r in matched(points(_niah(), 4096, _decode(), None, "m")).iter_rows(named=True)
    }
    assert got["quest"]["matched_sparsity"] == 0.95 and got["quest"]["correct"] == 9
    assert got["quest"]["attention_speedup"] == 0.5  # its own decode step
    assert got["topk"]["matched_sparsity"] == 0.95  # 99% missed its target
    assert got["h2o"]["matched_sparsity"] is None  # 5 of 10 is below 90% everywhere
    pts = points(_niah(), 4096, _decode(), None, "m")
    h2o = pts.filter(pl.col("policy") == "h2o")
    assert (h2o["attention_speedup"] == 3.0).all()  # an evicting policy: the evicted cache
    assert math.isnan(got["quest"]["end_to_end_speedup"])  # not measured


def test_a_prefill_speed_counts_only_for_the_selection_form_scored():
    rows = [
        dict(
            regime="prefill", policy=p, target_sparsity=s, correct=True, feasible=True, selection=f
        )
        for p, s, f in (("full", 0.0, "causal"), ("cab", 0.9, "prompt"))
        for _ in range(4)
    ]
    niah = pl.DataFrame(rows).with_columns(
        length=pl.lit(4096), task=pl.lit("passkey"), achieved_sparsity=pl.col("target_sparsity")
    )

    def bench(form):
        # full attention's attention 12 ms; CAB's selection 2 ms and attention 4 ms
        return pl.DataFrame(
            [
                dict(policy=p, selection=f, implementation="attnlab", target_sparsity=s,
                     speedup_vs_full=x, selection_ms=sel, attention_ms=att)
                for p, f, s, x, sel, att in (
                    ("full", "causal", 0.0, 1.0, 0.0, 12.0),
                    ("cab", form, 0.9, 1.5, 2.0, 4.0),
                )
            ]
        )  # fmt: skip

    timed = points(niah, 4096, None, bench("prompt"), "m")
    other = points(niah, 4096, None, bench("causal"), "m")
    assert timed["end_to_end_speedup"].to_list() == [1.5]
    assert timed["attention_speedup"].to_list() == [2.0]  # 12 / (2 + 4): the predictor counts
    assert math.isnan(other["end_to_end_speedup"][0]) and math.isnan(other["attention_speedup"][0])


def test_cache_end_to_end_speed_is_the_real_models_decode_of_the_scored_policy():
    generate = pl.DataFrame(
        [
            dict(policy=p, length=n, target_sparsity=s, speedup_vs_full=x)
            for p, n, x in (("quest", 4096, 0.7), ("quest", 8192, 9.0), ("topk", 4096, 0.6))
            for s in (0.9, 0.95, 0.99)
        ]
    )
    pts = points(_niah(), 4096, _decode(), None, "m", generate)
    speed = {
        (r["policy"], r["target_sparsity"]): r["end_to_end_speedup"]
        for r in pts.iter_rows(named=True)
    }
    assert speed[("quest", 0.95)] == 0.7  # its own length, not the 8k row
    assert speed[("topk", 0.9)] == 0.6
    assert math.isnan(speed[("h2o", 0.9)])  # not timed in the real model
    assert pts.filter(pl.col("policy") == "quest")["attention_speedup"].to_list() == [0.5] * 3
