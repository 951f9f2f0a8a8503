"""attnlab.phases: a pass's time split into the phases the attention marks."""

import time

import pytest
import torch

from attnlab.phases import Phases, phase


def test_phases_sum_their_spans_and_the_rest_is_the_remainder():
    with Phases("cpu") as phases:
        with phase("selection"):
            time.sleep(0.02)
        time.sleep(0.01)
        for _ in range(2):
            with phase("attention"):
                time.sleep(0.015)
    ms = phases.ms()
    assert ms["selection"] >= 20 and ms["attention"] >= 30 and ms["rest"] >= 10
    # the host's clock brackets the pass's (on the CPU both are the host's)
    assert ms["host"] >= ms["total"] >= 60


def test_a_phase_outside_a_timer_costs_nothing_and_phases_do_not_nest():
    with phase("selection"):  # no timer: a plain block
        x = torch.ones(2).sum()
    assert x == 2
    with Phases("cpu") as phases, phase("attention"), pytest.raises(RuntimeError, match="nest"):
        with phase("selection"):
            pass
    assert set(phases.spans) == {"attention"}


@pytest.mark.parametrize("observed", [False, True])
def test_a_policy_selection_counts_as_selection_on_every_path(observed):
    """A block policy's prefill on the CPU (the keep-mask path) and observed (the eager
    path that materialises the weights) both count each layer's selection as selection."""
    from tests.tiny_models import tiny_llama

    from attnlab import attention, decoding, policies, sparse

    model = tiny_llama()
    ids = torch.arange(100, 164)[None]
    run = sparse.SparseRun(policies.make("quest"), 0.75, regime="prefill", records=False)
    seen = []
    with Phases("cpu") as phases:
        if observed:
            with attention.observe(lambda layer, q, probs: seen.append(layer)):
                decoding.prefill(model, ids, run)
        else:
            decoding.prefill(model, ids, run)
    assert seen == ([0, 1] if observed else [])
    assert len(phases.spans["selection"]) == 2  # one per layer
    assert ("eager" in run.kernels) == observed
