"""The timing loop of the benchmarks_ref microbenchmarks: the median of CUDA-event times of
``reps`` launches after 3 warm-ups (no L2 flush between them, unlike attnlab's
``bench.timing.median_ms``), one call's event time, the profiler's GPU time of named
kernels, a module as a commit had it, XAttention's estimate's inputs at Gemma-3-270M's
shapes (and the A/B setup of its scripts) and the difference of two of its outputs, and a
32k prefill of a random-weight Gemma-3-270M under a policy. Imported by the scripts
beside it, run from the repository root as ``python benchmarks_ref/<script>.py``."""

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def module_at(commit: str, path: str, file: str | None = None):
    """The module ``path`` (e.g. src/attnlab/kernels/xattention.py) as ``commit`` had it,
    from git, or from ``file`` where given (a checkout without that commit); loaded from a
    file, since Triton reads a kernel's source."""
    if file is None:
        file = Path(tempfile.mkdtemp()) / Path(path).name
        file.write_bytes(subprocess.check_output(["git", "show", f"{commit}:{path}"]))
    spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_{commit}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_event_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def event_ms(fn) -> float:
    """CUDA-event time of one call of ``fn`` (no warm-up)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def call_kernel_ms(fn, match: str) -> tuple[float, float]:
    """The profiler's GPU time of one call of ``fn`` (no warm-up): every kernel's, and
    that of the kernels whose name holds ``match``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    matched = sum(e.device_time for e in gpu if match in e.name)
    return sum(e.device_time for e in gpu) / 1e3, matched / 1e3


def kernel_ms(fn, match: str, reps: int = 20) -> float:
    """The profiler's GPU time per call of the kernels whose name holds ``match`` ("" for
    every kernel), over ``reps`` calls after 3 warm-ups: no host time in it."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    gpu = [e.device_time for e in prof.events() if e.device_type == cuda and match in e.name]
    return sum(gpu) / 1e3 / reps


def xattention_inputs(t: int, dev: str = "cuda"):
    """XAttention's estimate at Gemma-3-270M's shapes (H=4, Hkv=1, D=256, bf16, block 128,
    stride 8) over t tokens, seed 0: q, k, the scaling, each query block's strided queries
    (lo, hi: one row per block) and a 512-key window's first visible block per row."""
    h, d, bs, st = 4, 256, 128, 8
    torch.manual_seed(0)
    q = torch.randn(1, h, t, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 1, t, d, device=dev, dtype=torch.bfloat16)
    mq, per = t // bs, bs // st
    lo = torch.arange(mq, device=dev) * per
    first = ((torch.arange(mq, device=dev) * bs - 511).clamp(min=0) // bs).to(torch.int32)
    return q, k, d**-0.5, lo, lo + per, first


def estimate_ab(commit: str):
    """The XAttention estimate scripts' A/B setup: T from ``sys.argv[1]`` (32768), the
    estimate's module as ``commit`` had it (or from the file ``sys.argv[2]``), its inputs
    at Gemma-3-270M's shapes (:func:`xattention_inputs`), the versions printed. Returns
    that module, (q, k, scaling, lo, hi) and the two cases (name, the rows' first blocks
    as the kernel takes them, as :func:`read_rel_diff` reads them): a global layer's
    (None, zeros) and a 512-key window's."""
    t = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    old = module_at(commit, "src/attnlab/kernels/xattention.py", (sys.argv[2:] or [None])[0])
    q, k, sc, lo, hi, xf = xattention_inputs(t)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    return old, (q, k, sc, lo, hi), (("causal", None, torch.zeros_like(lo)), ("window", xf, xf))


def read_rel_diff(a: torch.Tensor, b: torch.Tensor, first: torch.Tensor) -> float:
    """The largest relative difference of two estimates' block sums (B, H, R, Mk) over the
    blocks the rows read (from each row's ``first`` on) where ``a`` is not 0."""
    used = torch.arange(a.shape[-1], device=a.device)[None, :] >= first[:, None]
    return ((a - b).abs() / a.abs().clamp(min=1e-30))[used & (a > 0)].max().item()


def random_gemma_prefill(t: int):
    """``prefill(policy, sparsity)``: the last logits of a prefill of ``t`` random token ids
    through a Gemma-3-270M of the real config (gemma3_270m_config.json beside this file)
    with random weights (seed 0), bf16 on CUDA, attnlab's attention installed, the policy
    as the workflow's defaults make it, whole prompt, the prefill regime."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from attnlab import attention, decoding, policies, sparse, workflow

    raw = json.loads((Path(__file__).parent / "gemma3_270m_config.json").read_text())
    skip = ("architectures", "dtype", "transformers_version")
    kw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in skip}
    cfg = Gemma3TextConfig(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = attention.install(Gemma3ForCausalLM(cfg).to(dtype=torch.bfloat16).eval().cuda())
    ids = torch.randint(10, 200000, (1, t), device="cuda")
    params = workflow.effective()["policies"]  # the workflow's config, as its jobs read it

    def prefill(name: str, s: float) -> torch.Tensor:
        policy = policies.make(name, **workflow.policy_spec(name, params))
        run = sparse.SparseRun(policy, s, regime="prefill", whole_prompt=True, records=False)
        return decoding.prefill(model, ids, run)[1]

    return prefill
