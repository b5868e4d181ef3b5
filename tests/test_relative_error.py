"""RelativeError keeps its sums as one float64 tensor on the activations' device: batching and merging
(what summing over processes does) must not change its statistics, nor its zero policy."""
from __future__ import annotations

import math

import pytest
import torch

from robaudit.metrics import RelativeError

STATS = ("re_mean", "re_std", "re_pooled")


def _data(n: int = 17, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, 3, 5, generator=g)
    clean[4] = 0.0  # an all-zero clean activation: no RE for this sample
    clean[11] = 0.0
    return clean, clean + 0.2 * torch.randn(n, 3, 5, generator=g)


def _assert_same(a: dict, b: dict) -> None:
    for key in STATS:
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert (a["n_samples"], a["n_undefined"]) == (b["n_samples"], b["n_undefined"])


def test_state_is_one_float64_tensor_on_the_activations_device():
    clean, pert = _data()
    st = RelativeError()
    st.update(clean, pert)
    assert st.state.dtype == torch.float64 and st.state.shape == (len(RelativeError.FIELDS),)
    assert st.state.device == clean.device
    assert st.compute()["n_samples"] == 15 and st.compute()["n_undefined"] == 2


def test_batched_accumulation_equals_one_pass():
    clean, pert = _data()
    one = RelativeError()
    one.update(clean, pert)
    batched = RelativeError()
    for lo, hi in ((0, 3), (3, 4), (4, 12), (12, 17)):  # uneven; one batch holds only the zero sample
        batched.update(clean[lo:hi], pert[lo:hi])
    _assert_same(batched.compute(), one.compute())


def test_merging_two_instances_equals_one_fed_everything():
    clean, pert = _data()
    whole = RelativeError()
    whole.update(clean, pert)
    even, odd = RelativeError(), RelativeError()
    for b, lo in enumerate(range(0, 17, 4)):  # batches dealt alternately, as to two processes
        (even if b % 2 == 0 else odd).update(clean[lo:lo + 4], pert[lo:lo + 4])
    even_state, odd_state = even.state.clone(), odd.state.clone()  # merge adds into ``even`` in place
    for half in (even_state, odd_state):  # each stream alone misses samples: only both together are the whole
        assert RelativeError.summarize(half.tolist())["n_samples"] < whole.compute()["n_samples"]
    merged = even.merge(odd)
    _assert_same(merged.compute(), whole.compute())
    # the flat sum of the two states taken before merging (what one all_reduce does) gives the same statistics
    _assert_same(RelativeError.summarize((even_state + odd_state).tolist()), whole.compute())
    torch.testing.assert_close(merged.state, even_state + odd_state, rtol=0, atol=0)


def test_merging_an_empty_instance_changes_nothing_and_empty_is_nan():
    clean, pert = _data()
    st = RelativeError()
    st.update(clean, pert)
    before = st.compute()
    _assert_same(st.merge(RelativeError()).compute(), before)
    empty = RelativeError().compute()
    assert empty["n_samples"] == 0 and all(math.isnan(empty[k]) for k in STATS)


def test_zero_policy_all_zero_layer_is_nan_not_zero():
    st = RelativeError()
    st.update(torch.zeros(3, 4), torch.ones(3, 4))
    out = st.compute()
    assert out["n_samples"] == 0 and out["n_undefined"] == 3
    assert all(math.isnan(out[k]) for k in STATS)


def test_increments_of_many_layers_equal_one_update_per_layer():
    """The analysis adds every layer's sums of a batch in one set of operations: the same as layer by layer."""
    from robaudit.metrics import per_sample_sq_norms

    layers = [_data(seed=s) for s in (1, 2, 3)]
    one_by_one = []
    for clean, pert in layers:
        st = RelativeError()
        st.update(clean, pert)
        one_by_one.append(st)
    rows = RelativeError.increments(torch.stack([per_sample_sq_norms(c) for c, _ in layers]),
                                    torch.stack([per_sample_sq_norms(p - c) for c, p in layers]))
    for (row, st) in zip(rows, one_by_one):
        together = RelativeError()
        together.add(row)
        torch.testing.assert_close(together.state, st.state, rtol=0, atol=0)
        _assert_same(together.compute(), st.compute())
        assert together.compute()["n_undefined"] == 2
