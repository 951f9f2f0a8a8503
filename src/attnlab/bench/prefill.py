"""Real-model prefill latency under each policy at one prompt length: the speed half of
the long-context study's accuracy-matched table (results_ref/long_context/README.md).

Each (policy, sparsity) times :func:`attnlab.decoding.prefill` of one NIAH prompt in the
``prefill`` regime, the whole forward pass (the policy's selection, its attention kernel,
the rest of the model), as the NIAH jobs run it. The kernels each used are in the table
with their layer counts (``SparseRun.kernels``): full attention PyTorch's fused SDPA,
causal or under the model's own mask (sliding-window layers); a block policy
FlexAttention's block-sparse kernel in causal layers on CUDA; a token-level policy SDPA
under its keep-mask (in row chunks with ``--row-chunk``). On CUDA each block policy is
timed twice side by side: its selection through the Triton kernels (``attnlab``, the
NIAH jobs' path: the budget kernel, :mod:`attnlab.kernels.budget`, and CAB's, XAttention's
and Quest's predictors, :mod:`attnlab.kernels.cab`, ``xattention``, ``quest``)
and the same selection in PyTorch (``attnlab, PyTorch selection``). Under a sliding
window both run as ``SparseRun.tiles = "auto"`` does: a policy of blocks under
``windows.WHOLE_BELOW`` tokens that keeps what fits its budget runs the rows past the
budget's reach of the window (they keep every key they see) as the model's own mask, in
its BlockMask's tiles (the kernel's ``whole tiles apart``), a larger one its tiles of the
block; such a policy of blocks smaller than those tiles is also timed in the other form,
the same pairs (``attnlab, window layers in tiles of the block``, or ``attnlab, window
layers' whole tiles apart``). Beside them, the same model's prefill through transformers'
own attention implementations (``--transformers``: sdpa, flex_attention), the reference
attnlab's full attention is measured against. Each entry is timed in rounds with attnlab's
full attention and its other paths (one call of each per round,
:func:`attnlab.bench.timing.median_ms_rounds`): ``full_ms`` is full attention's median
over the entry's rounds and ``speedup_vs_full`` the ratio to it, so that a slower stretch
of the machine slows both sides of every ratio alike. Peak memory is the whole process's
over the entry's split pass, model included: one more pass of each attnlab entry, beside
the timed ones, splits its time (:mod:`attnlab.phases`): ``selection_ms`` (the policy
choosing its keys or blocks), ``attention_ms`` (the attention kernels, a block policy's
BlockMask included) and ``rest_ms`` (the rest of the model), so that the attention's share
of the prefill, which bounds what any policy can gain, is in the table; ``host_ms`` is how
long the host took to issue that pass (where it nears the pass's time, the GPU waited).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnlab.bench.timing import environment, median_ms_rounds, write_table
from attnlab.errors import UserError
from attnlab.phases import Phases


def kernel(run) -> str:
    """The attention kernels a prefill under ``run`` took, with their layer counts (for
    example sliding-window layers apart from global ones)."""
    return ", ".join(f"{name} x{n}" for name, n in sorted(run.kernels.items()))


@torch.inference_mode()
def hf_prefill(model, ids: torch.Tensor) -> None:
    """The prompt's forward pass as :func:`attnlab.decoding.prefill` runs it (a cache that
    keeps every key, the last row's logits), through the model's current implementation."""
    from transformers import DynamicCache

    model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)


def prompt_ids(path: str, length: int, device) -> torch.Tensor:
    """The first prompt of ``length`` tokens in a prompts table: (1, T) ids."""
    from attnlab import niah

    prompts = [p for p in niah.read_prompts(path) if p.length == length]
    if not prompts:
        raise UserError(f"{path} has no prompt of length {length}")
    return torch.tensor([prompts[0].input_ids], device=device)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (policy, target sparsity): median prefill milliseconds, repetitions,
    achieved sparsity, peak memory and the kernel."""
    from attnlab import attention, decoding, models, policies, sparse, windows

    # every policy built before the model loads: a bad setting stops the run before it times
    made = {name: policies.make(name, **args.policy_params.get(name, {})) for name in args.policies}
    full_policy = policies.make("full", **args.policy_params.get("full", {}))
    torch.set_num_threads(args.threads)
    model, _, _ = models.load(args.model, device=args.device, dtype=args.dtype)
    model = attention.install(model)
    ids = prompt_ids(args.prompts, args.length, model.device)
    cuda = model.device.type == "cuda"
    windowed = any(getattr(m, "sliding_window", None) for m in model.modules())
    rows = []

    def add(
        policy, s, timed, implementation, kernel_used, achieved, selection="causal", split=None
    ):
        """timed: (median ms, repetitions, full attention's median ms in the same rounds)."""
        (ms, reps, full_ms), nan = timed, float("nan")
        # split: the pass's phases (attnlab entries), else not measured
        split = split or dict.fromkeys(("selection", "attention", "rest", "host"), nan)
        rows.append(
            {
                "model": args.model,
                "length": ids.shape[-1],
                "regime": "prefill",
                "policy": policy,
                "selection": selection,
                "implementation": implementation,
                "target_sparsity": s,
                "achieved_sparsity": achieved,
                "ms": ms,
                "reps": reps,
                "full_ms": full_ms,
                "kernel": kernel_used,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                **{f"{k}_ms": split[k] for k in ("selection", "attention", "rest", "host")},
                "speedup_vs_full": full_ms / ms,  # side by side: the entry's own rounds
            }
        )
        print(
            f"{policy:<18} {implementation:<26} {s:5.2f} {ms:10.1f} ms"
            f"  ({reps} reps, {kernel_used})"
        )

    def attnlab_prefill(policy, s, fused=True, tiles="auto"):
        def prefill():
            r = sparse.SparseRun(
                policy,
                s,
                regime="prefill",
                row_chunk=args.row_chunk,
                whole_prompt=True,
                records=False,  # the policy alone: no recall against full attention
                fused=fused,
                tiles=tiles,
            )
            decoding.prefill(model, ids, r)
            return r

        return prefill

    # full attention, timed in rounds with every entry: each row's speedup side by side
    full = attnlab_prefill(full_policy, 0.0)

    def hf(impl):  # the model's own attention implementation, no attnlab run
        def prefill():
            model.set_attn_implementation(impl)
            try:
                hf_prefill(model, ids)
            finally:
                model.set_attn_implementation(attention.IMPLEMENTATION)

        return prefill

    for impl in args.transformers:
        if impl == "flex_attention" and not cuda:  # its mask compiles C++ code on the CPU
            print("transformers flex_attention: timed on CUDA only, skipped here")
            continue
        (full_ms, _), (ms, reps) = median_ms_rounds(
            [full, hf(impl)], model.device.type, args.rep_ms, args.min_reps, 50
        )
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        hf(impl)()  # its peak memory
        add("full", 0.0, (ms, reps, full_ms), f"transformers {impl}", impl, float("nan"))
    for name in args.policies:
        policy = made[name]
        # (fused, tiles): a block policy's selection in the fused Triton kernel (the
        # default, used on CUDA only) and, on CUDA, in PyTorch; blocks smaller than the
        # window BlockMask's tiles also with the window layers in the other form
        paths = [(True, "auto")]
        if cuda and policy.level == "block":
            paths += [(False, "auto")] * args.pytorch_selection
            if windowed and policy.block_size < windows.MODEL_TILE and policy.keeps_what_fits():
                other = {"whole": "block", "block": "whole"}
                paths.append((True, other[windows.tile_form("auto", policy.block_size)]))
        for s in [0.0] if name == "full" else args.sparsities:
            # the entry's paths and full attention, in rounds: side by side
            fns = [attnlab_prefill(policy, s, *path) for path in paths]
            fns = fns if name == "full" else [full, *fns]
            timed = median_ms_rounds(fns, model.device.type, args.rep_ms, args.min_reps, 50)
            full_ms = timed[0][0]
            for (fused, tiles), prefill, (ms, reps) in zip(
                paths, fns[-len(paths) :], timed[-len(paths) :], strict=True
            ):
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                with Phases(model.device) as phases:  # one more pass: where its time goes
                    r = prefill()
                impl = "attnlab" if fused else "attnlab, PyTorch selection"
                impl += {
                    "auto": "",
                    "block": ", window layers in tiles of the block",
                    "whole": ", window layers' whole tiles apart",
                }[tiles]
                achieved = r.recorder.achieved_sparsity
                entry = (ms, reps, full_ms)
                add(name, s, entry, impl, kernel(r), achieved, r.selection, phases.ms())
    return rows


def model_arguments(p: argparse.ArgumentParser, table: str, rep_ms: float, min_reps: int) -> None:
    """The options every real-model benchmark takes (``prefill``, ``generate``): the
    model, the prompt timed, the policies and sparsities, timing, device and output."""
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="a niah-prompts table")
    p.add_argument("--length", type=int, required=True, help="prompt length to time")
    p.add_argument("--policies", nargs="+", required=True)
    # an option of bench.CONFIG_KEYS left unset reads the config
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--rep-ms", type=float, default=rep_ms, help="time budget per entry")
    p.add_argument("--min-reps", type=int, default=min_reps)
    p.add_argument("--threads", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--out", default="results/bench", help=f"folder for {table}.parquet / .csv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab bench prefill``."""
    model_arguments(p, "prefill", rep_ms=3000.0, min_reps=3)
    p.add_argument("--row-chunk", type=int)  # a token policy's rows per call, as scored
    p.add_argument(
        "--policy-params",
        type=json.loads,
        default={},
        help="JSON: each policy's parameters as the NIAH jobs run it, by name (a variant: "
        'its base and settings, e.g. {"quest_global": {"base": "quest", "window_layers": '
        "false}}); a name not in it runs its defaults",
    )
    p.add_argument(
        "--pytorch-selection",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, also time each block policy's selection in PyTorch",
    )
    p.add_argument(
        "--transformers",
        nargs="*",
        default=["sdpa", "flex_attention"],
        help="transformers' own attention implementations to time beside (none: no rows; "
        "flex_attention on CUDA only)",
    )


def main(args: argparse.Namespace) -> list[dict]:
    """Time every policy and write ``prefill.parquet`` / ``.csv`` under ``--out``."""
    rows = run(args)
    write_table(rows, Path(args.out), "prefill", environment())
    return rows
