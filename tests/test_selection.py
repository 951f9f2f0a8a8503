"""Selection forms of the block policies in the prefill regime (DESIGN: Selection form):
``causal`` (a query block chosen by its first row) and ``prompt`` (by all its queries),
XAttention's prompt form against the released algorithm, CAB's against the whole graph,
and the refusal of ``prompt`` where rows are teacher-forced."""

import pytest
import torch

from attnlab import policies, sparse
from attnlab.errors import UserError
from attnlab.kernels.reference import cab_block_scores, top_blocks
from attnlab.policies.base import selection_form

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _blocks(policy, q, k, sparsity, scaling=0.25):
    """The run's per-query-block selection of a causal prefill: (B, H, Mq, Mk) bool."""
    run = sparse.SparseRun(policy, sparsity, whole_prompt=True)
    keep = run.block_mask(0, q, k, scaling)
    return keep


def _released_xattention(q, k, block, stride, threshold, scaling):
    """XAttention's prefill selection written from the released code's steps
    (mit-han-lab/x-attention, xattn_estimate and find_blocks_chunked, causal, threshold
    mode): strided queries (rows stride-1-s of each group, channels concatenated) against
    strided keys, scaled by scaling / stride, causal softmax over strided keys, summed into
    (query block, key block); block 0 and the diagonal forced and their sum counted first,
    then the other blocks in decreasing sum while the sum before them is under threshold
    x the row's total. q, k: (B, H, N, D), N a multiple of ``block``. -> (B, H, M, M)."""
    b, h, n, d = q.shape
    rq = torch.cat([q[:, :, stride - 1 - s :: stride] for s in range(stride)], dim=-1)
    rk = torch.cat([k[:, :, s::stride] for s in range(stride)], dim=-1)
    w = rq.double() @ rk.double().transpose(-1, -2) * scaling / stride  # (B, H, n/S, n/S)
    ns = n // stride
    w = w.masked_fill(torch.ones(ns, ns, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(w, dim=-1)
    per, m = block // stride, n // block
    sums = p.view(b, h, m, per, m, per).sum(-1).sum(-2)  # (B, H, M, M)
    forced = torch.zeros(m, m, dtype=torch.bool)
    forced[:, 0] = True
    forced |= torch.eye(m, dtype=torch.bool)
    keep = forced.expand(b, h, m, m).clone()
    for i in range(m):
        total = sums[..., i, :].sum(-1)  # (B, H)
        acc = (sums[..., i, :] * forced[i]).sum(-1)
        others = sums[..., i, :].masked_fill(forced[i], -1.0)
        vals, idx = others.sort(dim=-1, descending=True)
        for r in range(m):
            take = (acc < threshold * total) & (vals[..., r] >= 0) & (idx[..., r] <= i)
            picked = torch.zeros(b, h, m, dtype=torch.bool)
            keep[..., i, :] |= picked.scatter_(-1, idx[..., r : r + 1], take.unsqueeze(-1))
            acc = acc + vals[..., r].clamp(min=0)
    return keep & torch.ones(m, m, dtype=torch.bool).tril()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_xattention_prompt_selection_is_the_released_algorithm(seed, device):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, 256, 8, generator=g), torch.randn(1, 2, 256, 8, generator=g)
    policy = policies.make(
        "xattention", block_size=32, stride=4, threshold=0.7, threshold_only=True
    )
    got = _blocks(policy, q.to(device), k.to(device), 0.9).cpu()
    want = _released_xattention(q, k, 32, 4, 0.7, 0.25)
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < int(torch.ones(8, 8).tril().sum()) * 2  # the threshold acts


@pytest.mark.parametrize("device", DEVICES)
def test_cab_prompt_selection_ranks_the_whole_graph(device):
    """CAB's prompt form keeps, per query block, the best key blocks of the whole prompt's
    curvature scores (degrees over every query block), the diagonal and block 0 first."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 128, 8, generator=g), torch.randn(1, 2, 128, 8, generator=g)
    policy = policies.make("cab", block_size=16)
    got = _blocks(policy, q.to(device), k.to(device), 0.5).cpu()
    score = cab_block_scores(q, k, 16, 0.25)
    m = score.shape[-1]
    must = torch.eye(m, dtype=torch.bool)
    must[:, 0] = True
    budget = torch.round(0.5 * (torch.arange(m) * 16 + 16)).long()  # last rows' budgets
    want = top_blocks(score, torch.maximum(budget // 16, must.sum(-1)), must)
    assert torch.equal(got, want)
    causal = _blocks(policies.make("cab", block_size=16, selection="causal"), q, k, 0.5)
    assert not torch.equal(got, causal)  # the two forms differ on this prompt


def test_prompt_form_lets_the_question_choose_the_needle_block():
    """A planted prompt: key block 2 holds the needle (keys along e1); the last query
    block's last strided query (the question) points at it, its earlier rows are silent,
    and the block before points at blocks 4 and 5 (keys along e2). Chosen from all its
    queries, the last block keeps the needle's block; chosen by its first row (which has
    no complete strided query of its own block and reads the block before), it cannot."""
    d, bs = 8, 16
    q, k = torch.zeros(1, 1, 128, d), torch.zeros(1, 1, 128, d)
    k[0, 0, 32:48, 0] = 4.0  # the needle's block
    k[0, 0, 64:96, 1] = 4.0  # blocks 4 and 5
    q[0, 0, 96:112, 1] = 4.0  # the block before the question's
    q[0, 0, 124:128, 0] = 4.0  # the question: the last strided query
    for form, needle in (("prompt", True), ("causal", False)):
        policy = policies.make("xattention", block_size=bs, stride=4, threshold=0.9, selection=form)
        keep = _blocks(policy, q, k, 0.5, scaling=1.0)
        assert bool(keep[0, 0, 7, 2]) is needle, form
    assert bool(keep[0, 0, 7, 4]) and bool(keep[0, 0, 7, 5])  # causal: the earlier block's


def test_prompt_form_is_refused_for_teacher_forced_rows():
    cab = policies.make("cab")
    assert selection_form(cab, whole_prompt=True) == "prompt"  # the method's own form
    assert selection_form(cab, whole_prompt=False) == "causal"  # perplexity
    assert selection_form(policies.make("quest"), whole_prompt=True) == "causal"
    with pytest.raises(UserError, match="selection 'prompt'"):
        sparse.SparseRun(policies.make("cab", selection="prompt"), 0.9)
    run = sparse.SparseRun(policies.make("cab", selection="causal"), 0.9, whole_prompt=True)
    assert run.selection == "causal"


@pytest.mark.parametrize(
    "diagonal, sink", [(True, True), (True, False), (False, True), (False, False)]
)
def test_must_keep_blocks_marked_in_place_equal_the_masked_scores(diagonal, sink):
    """A fused prefill marks its own score's must-keep blocks in place (the rows' own
    blocks and block 0, as the policy asks): the same scores as marking a copy."""
    from attnlab.policies.selection import with_must_keep_blocks

    policy = policies.make("quest", block_size=16, keep_diagonal=diagonal, sink_block=sink)
    q_pos = torch.arange(0, 300, 16)  # each query block's first row
    score = torch.randn(2, 3, q_pos.numel(), 19, generator=torch.Generator().manual_seed(0))
    want = with_must_keep_blocks(score, q_pos, policy)
    got = with_must_keep_blocks(score.clone(), q_pos, policy, in_place=True)
    assert torch.equal(got, want)
    assert int(torch.isinf(want).sum()) == 2 * 3 * q_pos.numel() * (diagonal + sink) - 2 * 3 * (
        diagonal and sink
    )  # block 0's first row: its own block is block 0
