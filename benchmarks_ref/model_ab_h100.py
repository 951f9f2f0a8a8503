"""In-model A/B on a 32k prefill of a Gemma-3-270M of the real config
(gemma3_270m_config.json beside this script) and random weights, bf16: ``flex``,
FlexAttention's launch settings, old (flex's defaults: 16-row tiles in 4 warps, the
default tiles in 3 stages) against new (``flex.SMALL_TILE_WARPS``,
``flex.WIDE_HEAD_STAGES``); ``splits``, XAttention's estimate with every program sweeping
its rows' strided keys in one split (old) against splits of
``kernels.xattention.SPLIT_KEYS`` (new); ``threshold``, XAttention's threshold in
PyTorch (old) against its kernel (``kernels.xattention.THRESHOLD_BLOCKS``, new). Per
policy and sparsity: the profiler's GPU time of every kernel of one prefill and of
flex's, CUDA-event medians of 6 prefills each, old and new alternating (host-bound here:
read the kernel times), and whether the last logits are equal bit for bit. Run from the
repository root:
PYTHONPATH=src python benchmarks_ref/model_ab_h100.py flex|splits|threshold 32768 [cases]"""

import statistics
import sys

import torch

from _events import call_kernel_ms, event_ms, random_gemma_prefill
from attnlab import flex
from attnlab.kernels import xattention

WHAT = sys.argv[1]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
CASES = {
    "flex": "full:0,quest:0.95,quest:0.99,coarse_magnitude:0.95,coarse_magnitude:0.99,"
    "cab_directed:0.99,xattention:0.99,cab_b64:0.95",
    "splits": "full:0,xattention:0.95,xattention:0.99",
    "threshold": "full:0,xattention:0.95,xattention:0.99",
}[WHAT]
# flex: (16-row tiles' warps, default tiles' stages); splits: strided keys a program sweeps
# threshold: the most key blocks XAttention's fused threshold takes (0: its PyTorch tail)
SETTINGS = {
    "flex": {"old": (4, 3), "new": (2, 2)},
    "splits": {"old": 10**9, "new": 512},
    "threshold": {"old": 0, "new": 512},
}[WHAT]


def use(which: str) -> None:
    if WHAT == "flex":
        flex.SMALL_TILE_WARPS, flex.WIDE_HEAD_STAGES = SETTINGS[which]
    elif WHAT == "splits":
        xattention.SPLIT_KEYS = SETTINGS[which]
    else:
        xattention.THRESHOLD_BLOCKS = SETTINGS[which]


prefill = random_gemma_prefill(T)


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
with torch.inference_mode():
    for case in (sys.argv[3] if len(sys.argv) > 3 else CASES).split(","):
        name, s = case.split(":")

        def fn(name=name, s=float(s)):
            return prefill(name, s)

        logits, kernels, events = {}, {}, {"old": [], "new": []}
        for which in SETTINGS:
            use(which)
            logits[which] = fn()
            fn()
            kernels[which] = call_kernel_ms(fn, "flex_attention")
        for _ in range(6):
            for which in SETTINGS:
                use(which)
                events[which].append(event_ms(fn))
        (old, old_flex), (new, new_flex) = kernels["old"], kernels["new"]
        a, b = (statistics.median(events[w]) for w in SETTINGS)
        same = torch.equal(logits["old"], logits["new"])
        print(
            f"{name} {s}: kernels {old:.2f} -> {new:.2f} ms (flex {old_flex:.2f} ->"
            f" {new_flex:.2f}), events median {a:.2f} -> {b:.2f} ms, logits equal: {same}",
            flush=True,
        )
