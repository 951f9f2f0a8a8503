"""The Triton predictors compile for an H100/H200 (sm_90) as the GPU paths launch them,
within its shared memory, on a machine without a GPU: Triton's own compiler and ptxas,
in a subprocess with the interpreter off. Running them is the CUDA tests' part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def xattention_tiles(d, stride, per, nk, precision):
    """(constexprs, warps, stages) of XAttention's estimate as ``block_shares`` picks them
    (its tiles and its default warps)."""
    import inspect

    from attnlab.kernels.xattention import block_shares, launch_tiles

    tiles, stages = launch_tiles(d, stride, per, nk, precision)
    warps = inspect.signature(block_shares).parameters["num_warps"].default
    return tiles, warps, stages


def quest_tiles(dtype):
    """(constexprs, warps, stages) of Quest's bound as ``page_bound`` launches it at 32k
    (a fused prefill's: with the rows' bands)."""
    import torch

    from attnlab.kernels.quest import BOUND_WARPS, bound_tiles

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return {**bound_tiles(2048, 2048, 256, dt), "BANDS": True}, BOUND_WARPS, 3


def budget_shape(width, all_partial):
    """(constexprs, warps, stages) of the budget kernel as a fused prefill's
    ``budget_select`` launches a band of ``width`` blocks (kept pairs counted)."""
    from attnlab.kernels.budget import launch_shape

    size, warps = launch_shape(width)
    return dict(BLOCK=size, ALL_PARTIAL=all_partial, PAIRS=True), warps, 3


SHARED_MAX = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

# (module, kernel, pointer dtypes by parameter, constexprs, num_warps, num_stages): the
# launches of the scoring path (Gemma-3-270M: D = 256, bf16 Q and K, float32 A) and of
# the kernel benchmark (bf16 A)
LAUNCHES = [
    ("adjacency", "_adjacency_kernel", {"qc": "bf16", "kc": "bf16", "kd": "bf16", "a": "fp32"},
     dict(SOFTMAX=True, SHIFT=False, DIAG_KEY=True, FILL_UPPER=False, ALIGN=64,
          PRECISION="native", BM=64, BN=64, BD=256), 4, 3),
    ("adjacency", "_adjacency_kernel", {"qc": "bf16", "kc": "bf16", "kd": "bf16", "a": "bf16"},
     dict(SOFTMAX=False, SHIFT=True, DIAG_KEY=False, FILL_UPPER=False, ALIGN=128,
          PRECISION="native", BM=64, BN=64, BD=128), 4, 3),
    ("adjacency", "_adjacency_kernel", {"qc": "bf16", "kc": "bf16", "kd": "bf16", "a": "fp32"},
     dict(SOFTMAX=False, SHIFT=False, DIAG_KEY=False, FILL_UPPER=False, ALIGN=64,
          PRECISION="native", BM=64, BN=64, BD=256), 4, 3),  # "dot": one sweep
    ("curvature", "_causal_curvature_kernel", {"ar": "fp32", "af": "fp32"},
     dict(SYMMETRIC=True, ROWSUM=False, PRECISION="ieee", BT=64, BK=32), 4, 3),
    ("curvature", "_causal_curvature_kernel", {"ar": "fp32", "af": "fp32"},
     dict(SYMMETRIC=False, ROWSUM=False, PRECISION="ieee", BT=64, BK=32), 4, 3),
    ("curvature", "_causal_curvature_kernel", {"ar": "fp32", "af": "fp32"},
     dict(SYMMETRIC=False, ROWSUM=True, PRECISION="ieee", BT=64, BK=32), 4, 3),
    ("curvature", "_causal_curvature_kernel", {"ar": "bf16", "af": "bf16", "wf": "bf16"},
     dict(SYMMETRIC=True, ROWSUM=False, PRECISION="bf16", BT=64, BK=32), 4, 3),
    ("curvature", "_forman_ricci_kernel", {"a": "fp32"},
     dict(SYMMETRIC=True, PRECISION="ieee", BT=128, BK=16, EVEN=True), 8, 3),
    ("curvature", "_forman_ricci_kernel", {"a": "fp32"},  # a window's tiles (band_block)
     dict(SYMMETRIC=True, PRECISION="ieee", BT=16, BK=32, EVEN=True), 4, 3),
    # the symmetric graph's W, formed once from A
    *[("curvature", "_symmetrize_kernel", {"a": dt, "w": dt}, dict(BT=64), 4, 3)
      for dt in ("fp32", "bf16")],
    ("select", "_score_select_kernel", {"must": "u8", "mask": "i8"},
     dict(G=1, G_POW2=1, BLOCK=2048, FROM_SCORE=False, USE_F=True, USE_A=True, HAS_MUST=False,
          WRITE_SCORE=True, WRITE_MASK=False, WRITE_IDX=False, SELECT=False), 4, 3),
    # Quest's bound as page_bound launches it at 32k (2048 rows and pages of 16 keys)
    *[("quest", "_bound_kernel", {"q": dt, "lo": dt, "hi": dt}, *quest_tiles(dt))
      for dt in ("bf16", "fp32")],
    # XAttention's estimate as block_shares launches it (its own tile choice) at 32k
    *[("xattention", "_block_share_kernel", {"q": dt, "k": dt},
       *xattention_tiles(d, 8, 16, 4096, "ieee" if dt == "fp32" else "native"))
      for dt, d in (("bf16", 256), ("bf16", 128), ("fp32", 256))],
    # its scores from the sums, a row of 512 blocks (64k tokens in blocks of 128)
    ("xattention", "_threshold_kernel", {"seen": "u8", "must": "u8"},
     dict(BLOCK=512, CH=32, THRESHOLD_ONLY=False), 4, 3),
    # and the pass that joins its splits
    *[("xattention", "_block_share_finish", {},
       {n: v for n, v in xattention_tiles(256, 8, 16, 4096, p)[0].items()
        if n in ("PER", "G", "BI", "BN")}, xattention_tiles(256, 8, 16, 4096, p)[1], 3)
      for p in ("native", "ieee")],
    # a causal layer's longest rows at 32k (2048 blocks), a sliding window's band (33)
    *[("budget", "_budget_kernel",
       {"count": "i32", "budget": "i64", "keep": "i8", "pairs": "i64", "kept": "i64"},
       *budget_shape(width, partial)) for width, partial in ((2048, False), (33, True))],
]  # fmt: skip

# the strides each launch passes as 1 (a contiguous last dimension): Triton compiles an int
# argument equal to 1 as a constant, and one that is a multiple of 16 as aligned, which
# lets it vectorise and pipeline the loads through shared memory
UNIT_STRIDES = {
    "_adjacency_kernel": {"sq_d", "sk_d", "sd_d", "sa_n"},
    "_forman_ricci_kernel": {"sa_n", "sf_n"},
    "_symmetrize_kernel": {"s_n"},
    "_bound_kernel": {"sq_d", "sp_d"},
    "_block_share_kernel": {"sq_d", "sk_d"},
}

INT_POINTERS = {"keep", "full_num", "full_idx", "part_num", "part_idx", "lo", "hi", "first",
                "last", "tile_i", "tile_j"}  # fmt: skip


def _compile_all() -> list[dict]:
    """Compile every launch as the runtime specialises it (TRITON_INTERPRET=0 in this
    process): unit strides constant, pointers and every other int aligned to 16 (its most
    specialised form, so the most shared memory); name, shared bytes or the error's first
    line."""
    import importlib
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for module, name, dtypes, consts, warps, stages in LAUNCHES:
        fn = getattr(importlib.import_module(f"attnlab.kernels.{module}"), name)
        params = list(inspect.signature(fn.fn).parameters)
        consts = {**consts, **dict.fromkeys(UNIT_STRIDES.get(name, ()), 1)}
        sig, aligned = {}, {}
        for i, p in enumerate(params):
            base = p.removesuffix("_ptr")
            if p in consts:
                sig[p] = "constexpr"
            elif p.endswith("_ptr"):
                kind = dtypes.get(base, "i32" if base in INT_POINTERS else "fp32")
                sig[p] = f"*{kind}"
                aligned[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[p] = "fp32" if p in ("scaling", "lam") else "i32"
                if sig[p] == "i32":  # as if a multiple of 16: the most it can specialise
                    aligned[(i,)] = [["tt.divisibility", 16]]
        constexprs = {(params.index(k),): v for k, v in consts.items()}
        src = ASTSource(fn, sig, constexprs, aligned)
        try:
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", 90, 32),
                options={"num_warps": warps, "num_stages": stages},
            )
            out.append({"kernel": name, "shared": kernel.metadata.shared})
        except Exception as err:  # noqa: BLE001 (reported by the test)
            out.append({"kernel": name, "error": f"{type(err).__name__}: {err}"[:400]})
    return out


def test_the_gpu_paths_kernels_compile_for_sm90_within_shared_memory():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no CUDA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(LAUNCHES)
    for launch, result in zip(LAUNCHES, results, strict=True):
        assert "error" not in result, (launch[1], launch[3], result["error"])
        assert result["shared"] <= SHARED_MAX, (launch[1], launch[3], result["shared"])


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
