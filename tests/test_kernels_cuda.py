"""The compiled Triton kernels equal their references on a GPU, in bf16 at a realistic
shape, and flex attention on a CAB selection equals eager masked attention.

These are the checks the kernel benchmark used to run before timing. They need CUDA and
the compiled kernels (``TRITON_INTERPRET=0``, which the test session otherwise sets to 1):
``TRITON_INTERPRET=0 pytest -m cuda``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] == "0"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ON_GPU, reason="needs CUDA and TRITON_INTERPRET=0"),
]

from attnlab.bench.budgets import must_keep_mask, scored_blocks_per_query_block  # noqa: E402
from attnlab.kernels import reference as ref  # noqa: E402

DEV = "cuda"
BLOCK = 64
SCALING = 128**-0.5
N_RAGGED = 4096 + 37  # a ragged last block


def _rel(x, y) -> float:
    """Relative error of x against y in float64."""
    return ((x.double() - y.double()).norm() / y.double().norm().clamp(min=1e-30)).item()


def _qkv(n: int, seed: int):
    """(1, 8, n, 128) queries and (1, 2, n, 128) keys and values in bf16: GQA 8 -> 2."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    shapes = ((1, 8, n, 128), (1, 2, n, 128), (1, 2, n, 128))
    return [torch.randn(*s, generator=gen, device=DEV, dtype=torch.bfloat16) for s in shapes]


@pytest.fixture(scope="module")
def coarse():
    """Queries, keys and their max-L2 coarsening at 64-token blocks."""
    from attnlab.kernels.coarsen import coarsen_max_l2

    q, k, _ = _qkv(N_RAGGED, seed=1)
    return q, k, coarsen_max_l2(q, BLOCK), coarsen_max_l2(k, BLOCK)


def test_coarsen_bf16_equals_reference_exactly(coarse):
    """Against the reference on the GPU (its norms from the norms kernel) and on the CPU
    (PyTorch's): random tokens, no norms tied to rounding."""
    q, _, qc, _ = coarse
    assert (qc != ref.coarsen_max_l2(q, BLOCK)).sum().item() == 0
    assert torch.equal(qc.cpu(), ref.coarsen_max_l2(q.cpu(), BLOCK))


@pytest.mark.parametrize("adjacency", ["softmax", "scores"])
def test_adjacency_and_forman_ricci_match_reference(coarse, adjacency):
    from attnlab.kernels.adjacency import coarse_adjacency
    from attnlab.kernels.curvature import forman_ricci

    _, _, qc, kc = coarse
    a = coarse_adjacency(qc, kc, SCALING, adjacency)
    assert _rel(a, ref.coarse_adjacency(qc, kc, SCALING, adjacency)) <= 1e-5
    for graph in ("directed", "symmetric"):
        for precision, tol in (("ieee", 1e-5), ("tf32", 3e-3), ("bf16", 1e-2)):
            err = _rel(forman_ricci(a, graph, precision), ref.forman_ricci(a, graph))
            assert err <= tol, (graph, precision, err)


def test_select_blocks_equals_reference(coarse):
    from attnlab.kernels.select import top_blocks

    m = coarse[2].shape[2]
    gen = torch.Generator(device=DEV).manual_seed(2)
    score = torch.randn(2, 4, m, m, generator=gen, device=DEV)
    causal = torch.ones(m, m, dtype=torch.bool, device=DEV).tril()
    score = score.masked_fill(~causal, float("-inf"))
    keep = torch.randint(0, 12, (m,), generator=gen, device=DEV)
    assert (top_blocks(score, keep) != ref.top_blocks(score, keep)).sum().item() == 0


def _block_lists_as_mask(sel, m: int) -> torch.Tensor:
    """(B, H, Mg, m) bool: the blocks the full and partial lists of a selection name."""
    lists = torch.zeros(*sel.mask.shape[:-1], m + 1, dtype=torch.bool, device=DEV)
    for num, idx in ((sel.full_num, sel.full_idx), (sel.partial_num, sel.partial_idx)):
        valid = torch.arange(m, device=DEV) < num.unsqueeze(-1)
        lists.scatter_(-1, idx.long().masked_fill(~valid, m), True)  # column m: the unused tail
    return lists[..., :m]


@pytest.mark.parametrize(
    "lam, adjacency, graph", [(1.0, "softmax", "directed"), (0.5, "scores", "symmetric")]
)
def test_cab_select_matches_reference_scores_and_selection(coarse, lam, adjacency, graph):
    from attnlab.kernels.cab import cab_select

    q, k, qc, _ = coarse
    m, g = qc.shape[2], 2
    keep = torch.full((-(-m // g),), 5, device=DEV)
    must = must_keep_mask(m, g, 1).to(DEV)
    kw = dict(lam=lam, adjacency=adjacency, graph=graph, must_keep=must, q_group=g)
    kw |= dict(write_score=True, write_mask=True)
    sel = cab_select(q, k, BLOCK, SCALING, keep, precision="ieee", **kw)
    expected = ref.cab_block_scores(q, k, BLOCK, SCALING, lam, adjacency, graph)
    fin = torch.isfinite(expected)
    assert _rel(sel.score[fin], expected[fin]) <= 1e-4
    own = ref.top_blocks_grouped(sel.score, keep, g, must)
    assert (sel.mask != own).sum().item() == 0  # exact on the kernel's own scores
    assert (_block_lists_as_mask(sel, m) != sel.mask).sum().item() == 0

    fast = cab_select(q, k, BLOCK, SCALING, keep, precision="bf16", **kw)
    assert _rel(fast.score[fin], expected[fin]) <= 5e-2
    changed = (fast.mask != sel.mask).sum().item() / (2 * sel.mask.sum().item())
    assert changed <= 0.05  # share of the selection bf16 changes against ieee


def _masked_reference(q, k, v, keep_tokens):
    """Eager softmax attention in float64 under a (B, H, N, N) token mask."""
    grp = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(grp, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~keep_tokens, float("-inf")), -1).nan_to_num(0.0)
    return p @ vv


@pytest.fixture(scope="module")
def flex_inputs():
    """2048 tokens of bf16 queries, keys and values, the token positions and causal mask."""
    n = 2048
    q, k, v = _qkv(n, seed=3)
    t = torch.arange(n, device=DEV)
    return q, k, v, t, t[:, None] >= t[None, :]


def test_flex_block_sparse_64x64_matches_eager_masked(flex_inputs):
    from attnlab.flex import flex_block_sparse_attention

    q, k, v, t, causal = flex_inputs
    m = len(t) // BLOCK
    gen = torch.Generator(device=DEV).manual_seed(4)
    keep = torch.rand(1, 8, m, m, generator=gen, device=DEV) < 0.2
    keep |= torch.eye(m, dtype=torch.bool, device=DEV)
    out = flex_block_sparse_attention(q, k, v, keep, BLOCK, SCALING)
    token_keep = keep[:, :, t[:, None] // BLOCK, t[None, :] // BLOCK] & causal
    assert _rel(out, _masked_reference(q, k, v, token_keep)) <= 1e-2


def test_flex_on_cab_selection_128x64_matches_eager_masked(flex_inputs):
    from attnlab.flex import flex_attention_from_selection
    from attnlab.kernels.cab import cab_select

    q, k, v, t, causal = flex_inputs
    m = len(t) // BLOCK
    keep = scored_blocks_per_query_block(len(t), BLOCK, 0.9, 2).to(DEV)
    must = must_keep_mask(m, 2, 1).to(DEV)
    sel = cab_select(q, k, BLOCK, SCALING, keep, must_keep=must, q_group=2, write_mask=True)
    out = flex_attention_from_selection(q, k, v, sel, BLOCK, SCALING)
    token_keep = sel.mask[:, :, t[:, None] // (2 * BLOCK), t[None, :] // BLOCK] & causal
    assert _rel(out, _masked_reference(q, k, v, token_keep)) <= 1e-2


@pytest.mark.parametrize(
    "policy", ["quest", "cab", "coarse_magnitude", "random_block", "xattention"]
)
def test_a_fused_prefill_waits_for_the_device_per_pass_not_per_layer(policy):
    """What a block policy's fused prefill reads on the host (a mask's lists and bands) is
    read once per forward pass and mask, or made by formula (a plain window's: no wait),
    so the host can run ahead of the device: no line of attnlab waits for the device in
    more than two of a model's five window layers. (An indexed assignment of a Python
    number, for one, copies it to the device and waits: once per layer.)"""
    import collections
    import warnings

    from tests.tiny_models import tiny_gemma3

    from attnlab import decoding, policies, sparse
    from attnlab.kernels.budget import row_bands

    model = tiny_gemma3(window_layers=5).cuda()
    ids = torch.randint(0, 5000, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()

    def prefill():
        policy_ = policies.make(policy, block_size=16)
        # as attnlab bench prefill times it: recall at the last row (the NIAH jobs') reads
        # each layer's budget on the host
        run = sparse.SparseRun(policy_, 0.8, whole_prompt=True, records=False)
        decoding.prefill(model, ids, run)
        return run

    prefill()  # compiled on the first pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run = prefill()
            row_bands(torch.ones(1, 1, 2, 2, dtype=torch.long, device=DEV))  # a known wait
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sum(n for k, n in run.kernels.items() if "fused selection" in k) == 6
    waits = collections.Counter(
        (w.filename, w.lineno)
        for w in caught
        if "synchroniz" in str(w.message) and "attnlab" in w.filename
    )
    # the known wait is seen (else the check would miss one), and no line waits per layer
    assert any(f.endswith("budget.py") for f, _ in waits), waits
    assert max(waits.values()) <= 2, waits
