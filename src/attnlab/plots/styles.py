"""How the NIAH figures draw policies: one colour and legend place per policy in every
figure, policies grouped a handful to a panel, names marked where a method runs in this
project's extension of it, and the haystack a table's rows used."""

from __future__ import annotations

import matplotlib.pyplot as plt
import polars as pl


def panel_rows(df: pl.DataFrame) -> list[tuple[str, str]]:
    """The (model, regime) pairs of a table, in its order: one figure row each."""
    return [tuple(r) for r in df.select("model", "regime").unique(maintain_order=True).rows()]


def shown_name(d: pl.DataFrame, policy: str) -> str:
    """A policy's name in a panel of rows ``d``: marked "(ext.)" where those rows ran a
    form of the method that this project extends it to (the table's ``extension``
    column: Quest and H2O in the prefill regime); unmarked in tables without it."""
    if "extension" in d.columns:
        if d.filter((pl.col("policy") == policy) & pl.col("extension")).height:
            return f"{policy} (ext.)"
    return policy


# Every policy's place in legends and its colour, the same in every figure; groups of at
# most about six lines a panel (full attention and the oracle drawn in each).
POLICY_GROUPS = {
    "token-level peers": ("h2o", "streamingllm", "snapkv"),
    "estimated top-k": (
        "sparq",
        "loki",
        "two_stage",
        "twilight",
        "quest_twilight",
        "sparq_twilight",
    ),
    "Quest and XAttention": (
        "quest",
        "quest_dense2",
        "xattention",
        "xattention_causal",
        "xattention_free",
    ),
    "CAB and its ablations": ("cab", "cab_causal", "cab_quest", "coarse_magnitude", "random_block"),
    "CAB's variants": (
        "cab_plan",
        "cab_directed",
        "cab_b64",
        "cab_query",
        "cab_quest_blend",
        "cab_sparq_blend",
    ),
}
POLICY_ORDER = ("full", "topk", *(p for g in POLICY_GROUPS.values() for p in g))


def policy_group(policy: str) -> str:
    """The group a policy is drawn with: its entry in POLICY_GROUPS; CAB at another lambda
    with CAB's variants, a kvpress press with the token-level peers."""
    for group, names in POLICY_GROUPS.items():
        if policy in names:
            return group
    return "CAB's variants" if policy.startswith("cab_") else "token-level peers"


def ordered(policies) -> list[str]:
    """Policies in legend order: POLICY_ORDER, then any other in name order."""
    rank = {p: i for i, p in enumerate(POLICY_ORDER)}
    return sorted(dict.fromkeys(policies), key=lambda p: (rank.get(p, len(rank)), p))


def policy_styles(policies) -> dict[str, dict]:
    """One line style per policy, the same in every figure: full attention dark grey and
    dashed, the top-k oracle (the ceiling) black and dotted, the others a colour fixed by
    their place in POLICY_ORDER (policies outside it after, in name order): tab20's
    colours, then tab20b's, distinct for the first 40."""
    others = [p for p in ordered([*POLICY_ORDER, *policies]) if p not in ("full", "topk")]
    palette = [*plt.cm.tab20.colors, *plt.cm.tab20b.colors]
    styles = {p: {"color": palette[i % len(palette)]} for i, p in enumerate(others)}
    styles["full"] = {"color": "0.35", "linestyle": "--", "zorder": 4}
    styles["topk"] = {"color": "black", "linestyle": ":", "zorder": 4}
    return styles


HEATMAP_WIDTH = 6  # heatmap panels per figure row


def haystack_of(df: pl.DataFrame, meta: dict) -> str:
    """The haystacks a table's rows hid their needles in (its ``haystack`` column, else its
    metadata's), for a figure's title."""
    if "haystack" in df.columns:
        found = [h for h in df["haystack"].unique().sort().to_list() if h is not None]
        if found:
            return ", ".join(found)
    return meta.get("haystack") or "not recorded"


def in_group(policy: str, group: str) -> bool:
    """Whether a panel of ``group`` draws ``policy`` (full attention and the oracle: always)."""
    return policy in ("full", "topk") or policy_group(policy) == group


def group_rows(df: pl.DataFrame) -> list[tuple[str, str, str]]:
    """(model, regime, group) of every policy group a (model, regime) ran: a figure row each."""
    out = []
    for model, regime in panel_rows(df):
        d = df.filter((pl.col("model") == model) & (pl.col("regime") == regime))
        ran = {policy_group(p) for p in d["policy"].unique() if p not in ("full", "topk")}
        out += [(model, regime, g) for g in POLICY_GROUPS if g in ran]
    return out
