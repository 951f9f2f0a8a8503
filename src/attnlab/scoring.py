"""What a scoring job under one policy shares, in the NIAH and perplexity stages: the
policy and the model it runs in, and the columns that mark each result row with its run.

The policy registry is imported by name (:func:`importlib.import_module`), so that
:func:`attnlab.sources.module_sources` does not follow it into every policy's module: a
rule lists the one policy module its job runs, and editing another policy reruns nothing.
"""

from __future__ import annotations

from importlib import import_module


def make_policy(name: str, params: dict, target: float):
    """The policy ``name`` with ``params``, and its target sparsity (0 for full attention)."""
    policy = import_module("attnlab.policies").make(name, **params)
    return policy, 0.0 if policy.name == "full" else target


def load_job(job, policy: str, params: dict, sparsity: float, whole_prompt: bool = True):
    """``(policy, sparsity, model, tokenizer)`` of a run of a job's record: the policy from
    its name and parameters, its target sparsity, and the model of :func:`load_model`.
    ``whole_prompt`` False (teacher-forced rows): a policy asking for the prompt selection
    form is refused before the model loads."""
    from attnlab.policies.base import selection_form

    run, target = make_policy(policy, params, sparsity)
    selection_form(run, whole_prompt)
    net, tokenizer, _ = load_model(job)
    return run, target, net, tokenizer


def load_model(job):
    """``(model, tokenizer, info)`` of a job's record: the model with attnlab's attention
    on the record's device and dtype, torch on the record's threads."""
    import torch

    from attnlab import attention, models

    torch.set_num_threads(job.threads)
    net, tokenizer, info = models.load(job.model, device=job.device, dtype=job.dtype)
    return attention.install(net), tokenizer, info


def mark_rows(
    rows: list[dict], model: str, name: str, policy, sparsity: float, tolerance: float
) -> dict:
    """Mark each result row with its run and feasibility (achieved sparsity within
    ``tolerance`` of the target); returns the run's metadata."""
    for r in rows:
        r.update(
            model=model,
            policy=name,
            target_sparsity=sparsity,
            feasible=r["achieved_sparsity"] >= sparsity - tolerance,
        )
    return {
        "policy": name,
        "params": policy.params(),
        "target_sparsity": sparsity,
        "tolerance": tolerance,
    }


def log_gpu_peak(device: str) -> None:
    """Write the job's peak GPU memory to its log (stderr), when it ran on CUDA: what the
    GPU profile's memory claims (``gpu_mem_gb``) are sized from."""
    import sys

    import torch

    if torch.cuda.is_available() and device != "cpu":
        gib = 2**30
        print(
            f"peak GPU memory: {torch.cuda.max_memory_reserved() / gib:.1f} GiB reserved, "
            f"{torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated",
            file=sys.stderr,
        )
