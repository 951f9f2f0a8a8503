"""``attnlab bench decode``: each timed step attends over the keys its policy defines."""

import torch

from attnlab.bench import decode

H, HKV, D, T, N = 4, 2, 16, 256, 32  # grouped-query attention, two query heads a KV head


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, 1, D, generator=g)
    k, v = torch.randn(1, HKV, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g)
    return q, k, v


def _cut_gap(score: torch.Tensor, n: int) -> float:
    """The smallest gap, over the heads, between the n-th and (n+1)-th largest of ``score``
    (H, T): above float noise, the selection does not depend on how a path rounds."""
    top = score.topk(n + 1, -1).values
    return float((top[:, n - 1] - top[:, n]).min())


def _over(q, k, v, keep):
    """Attention of each query head over the keys ``keep`` (H, T) bool shows."""
    kx, vx = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    s = (q @ kx.transpose(-1, -2))[:, :, 0] * D**-0.5  # (1, H, T)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return p.unsqueeze(2) @ vx  # (1, H, 1, D)


def test_decode_steps_attend_over_their_policys_keys():
    q, k, v = _inputs()
    kx = k.repeat_interleave(H // HKV, 1)[0]  # (H, T, D)
    scale = D**-0.5
    pages = k.view(1, HKV, T // 16, 16, D)
    bounds = (pages.amin(3), pages.amax(3))
    kt = k.transpose(-1, -2).contiguous()
    every = torch.ones(H, T, dtype=torch.bool)
    dense = decode.step("dense", q, k, v, T, scale)
    torch.testing.assert_close(dense, _over(q, k, v, every))
    # top-k: the N keys of largest score per query head
    s = (q[0] @ kx.transpose(-1, -2))[:, 0]  # (H, T)
    keep = torch.zeros(H, T, dtype=torch.bool).scatter_(-1, s.topk(N, -1).indices, True)
    torch.testing.assert_close(decode.step("topk", q, k, v, N, scale), _over(q, k, v, keep))
    # Quest: the N / 16 pages of largest bound sum_d max(q_d min_d, q_d max_d)
    kmin, kmax = (b.repeat_interleave(H // HKV, 1)[0] for b in bounds)  # (H, P, D)
    qd = q[0, :, 0, None, :]  # (H, 1, D)
    ub = torch.maximum(qd * kmin, qd * kmax).sum(-1)  # (H, P)
    keep = ub.topk(N // 16, -1).indices
    keep = torch.zeros(H, T // 16, dtype=torch.bool).scatter_(-1, keep, True)
    keep = keep.repeat_interleave(16, -1)
    got = decode.step("quest", q, k, v, N, scale, 16, bounds)
    torch.testing.assert_close(got, _over(q, k, v, keep))
    # SparQ: the N keys of largest q . k over the query's D / 8 largest-|q| channels
    ch = q[0, :, 0].abs().topk(D // 8, -1).indices  # (H, r)
    approx = torch.einsum(
        "hr,htr->ht", q[0, :, 0].gather(-1, ch), kx.gather(-1, ch[:, None].expand(-1, T, -1))
    )
    keep = torch.zeros(H, T, dtype=torch.bool).scatter_(-1, approx.topk(N, -1).indices, True)
    got = decode.step("sparq", q, k, v, N, scale, kt=kt)
    torch.testing.assert_close(got, _over(q, k, v, keep))
    assert not torch.allclose(got, dense, atol=1e-3)  # the selection changes the output


def test_loki_and_two_stage_steps_attend_over_their_policys_keys():
    """Loki: the N keys of largest score from the first D / 4 coordinates in the keys'
    rotated axes; two-stage: Quest's best pages holding 4 N keys, then the N of largest
    exact score among them."""
    q, k, v = _inputs()
    kx = k.repeat_interleave(H // HKV, 1)[0]  # (H, T, D)
    scale = D**-0.5
    g = torch.Generator().manual_seed(1)
    axes = torch.linalg.qr(torch.randn(HKV, D, D, generator=g)).Q  # (Hkv, D, D)
    rotated = (axes, (k[0] @ axes).transpose(-1, -2).contiguous().unsqueeze(0))
    r = D // 4
    ax = axes.repeat_interleave(H // HKV, 0)[:, :, :r]  # (H, D, r)
    approx = ((q[0] @ ax) @ (kx @ ax).transpose(-1, -2))[:, 0]  # (H, T)
    assert _cut_gap(approx, N) > 1e-3  # not decided by rounding
    keep = torch.zeros(H, T, dtype=torch.bool).scatter_(-1, approx.topk(N, -1).indices, True)
    got = decode.step("loki", q, k, v, N, scale, rotated=rotated)
    torch.testing.assert_close(got, _over(q, k, v, keep), rtol=1e-5, atol=1e-5)
    pages = k.view(1, HKV, T // 16, 16, D)
    bounds = (pages.amin(3), pages.amax(3))
    kmin, kmax = (b.repeat_interleave(H // HKV, 1)[0] for b in bounds)  # (H, P, D)
    qd = q[0, :, 0, None, :]
    ub = torch.maximum(qd * kmin, qd * kmax).sum(-1)  # (H, P)
    assert _cut_gap(ub, 4 * N // 16) > 1e-3
    cand = torch.zeros(H, T // 16, dtype=torch.bool)
    cand = cand.scatter_(-1, ub.topk(4 * N // 16, -1).indices, True).repeat_interleave(16, -1)
    s = (q[0] @ kx.transpose(-1, -2))[:, 0].masked_fill(~cand, float("-inf"))  # (H, T)
    assert _cut_gap(s, N) > 1e-3
    keep = torch.zeros(H, T, dtype=torch.bool).scatter_(-1, s.topk(N, -1).indices, True)
    got = decode.step("two_stage", q, k, v, N, scale, 16, bounds)
    torch.testing.assert_close(got, _over(q, k, v, keep))


def test_the_decode_benchmark_times_every_policy(tmp_path):
    """Every policy's step runs at every budget and has its speedup against dense."""
    import argparse

    args = argparse.Namespace(
        shapes=["gemma3-270m"], lengths=[1024], policies=list(decode.POLICIES),
        sparsities=[0.9, 0.99], page=16, dtype="float32", rep_ms=1.0, min_reps=1,
        device="cpu", out=str(tmp_path), fig="",
    )  # fmt: skip
    rows = decode.main(args)
    assert {r["policy"] for r in rows} == set(decode.POLICIES)
    assert len(rows) == 1 + 2 * (len(decode.POLICIES) - 1)
    assert all(r["speedup_vs_dense"] > 0 for r in rows)
