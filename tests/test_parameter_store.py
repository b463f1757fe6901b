"""The parameter server's aggregation rules, without Ray."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from distmeta.optim import adam, sgd
from distmeta.runtime.parameter_store import FlatContribution, FlatLayout, NonFiniteError, ParameterStore


def params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, generator=g), "head.bias": torch.randn(5, generator=g)}


def part(seed: int, tasks: int, loss: float = 1.0) -> FlatContribution:
    grad = torch.randn(4 * 3 * 3 + 5, generator=torch.Generator().manual_seed(seed))
    return FlatContribution(grad, tasks, {"loss": loss * tasks})


def test_layout_round_trips_in_model_order():
    phi = params()
    layout = FlatLayout.of(phi)
    flat = layout.flatten(phi)
    assert flat.shape == (41,) and layout.names == ("conv.weight", "head.bias")
    assert all(torch.equal(phi[n], t) for n, t in layout.unflatten(flat).items())


def test_flat_adam_equals_adam_on_the_parameter_dict():
    """Adam is elementwise, so one flat buffer gives the very same bits as per-tensor updates."""
    phi, optimizer = params(), adam(1e-2)
    store = ParameterStore(phi, optimizer, meta_batch=4)
    reference, state = phi, optimizer.init(phi)
    for step in range(3):
        contribution = part(step, 4)
        assert store.submit(step, 0, contribution) == "applied"
        grads = {n: g / 4 for n, g in store.layout.unflatten(contribution.grad_sum).items()}
        reference, state = optimizer.update(reference, grads, state)
    assert all(torch.equal(store.phi()[n], reference[n]) for n in reference)


def test_sync_sums_slices_in_task_order_whatever_the_arrival_order():
    forward, backward = (ParameterStore(params(), adam(1e-2), meta_batch=10, slices=3) for _ in range(2))
    parts = [part(0, 3), part(1, 3), part(2, 4)]
    assert [forward.submit(0, i, p) for i, p in enumerate(parts)] == ["pending", "pending", "applied"]
    assert [backward.submit(0, i, parts[i]) for i in (2, 0, 1)] == ["pending", "pending", "applied"]
    assert torch.equal(forward.flat, backward.flat)
    expected = params()
    mean = (parts[0].grad_sum + parts[1].grad_sum + parts[2].grad_sum) / 10
    sgd_store = ParameterStore(params(), sgd(0.5), meta_batch=10, slices=3)
    for i, p in enumerate(parts):
        sgd_store.submit(0, i, p)
    assert torch.equal(sgd_store.flat, FlatLayout.of(expected).flatten(expected) - 0.5 * mean)
    [record] = forward.take_records()
    assert record.step == 0 and record.num_tasks == 10 and record.metrics["loss"] == 10.0


def test_sync_ignores_duplicates_and_drops_other_versions():
    store = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=2)
    assert store.submit(0, 0, part(0, 2)) == "pending"
    assert store.submit(0, 0, part(5, 2)) == "duplicate"  # a retried slice: the first copy counts
    assert store.submit(1, 1, part(1, 2)) == "stale"
    assert store.submit(0, 1, part(1, 2)) == "applied"
    twin = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=2)
    twin.submit(0, 0, part(0, 2)), twin.submit(0, 1, part(1, 2))
    assert torch.equal(store.flat, twin.flat) and store.version == 1


def test_non_finite_slices_are_rejected_counted_and_never_applied():
    store = ParameterStore(params(), sgd(0.1), meta_batch=2, slices=1)
    before = store.flat.clone()
    bad = part(0, 2)
    bad.grad_sum[3] = float("nan")
    assert store.submit(0, 0, bad) == "rejected"
    assert store.submit(0, 0, part(0, 2, loss=float("inf"))) == "rejected"
    assert store.rejected == 2 and store.version == 0 and torch.equal(store.flat, before)
    assert store.submit(0, 0, part(0, 2)) == "applied"


def test_sync_rejects_a_step_s_non_finite_slices_when_it_completes_and_keeps_the_finite_ones():
    store = ParameterStore(params(), sgd(0.1), meta_batch=6, slices=3)
    before, bad = store.flat.clone(), part(1, 2)
    bad.grad_sum[3] = float("inf")
    assert store.submit(0, 0, part(0, 2)) == "pending"
    assert store.submit(0, 1, bad) == "pending"  # found when the sum is checked, at the step's last slice
    assert store.submit(0, 2, part(2, 2)) == "rejected"
    assert store.rejected == 1 and store.version == 0 and torch.equal(store.flat, before)
    assert store.submit(0, 0, part(0, 2)) == "duplicate" and store.submit(0, 2, part(2, 2)) == "duplicate"
    assert store.submit(0, 1, part(1, 2)) == "applied"  # the recomputed slice completes the step
    twin = ParameterStore(params(), sgd(0.1), meta_batch=6, slices=3)
    for i in range(3):
        twin.submit(0, i, part(i, 2))
    assert torch.equal(store.flat, twin.flat)
    huge = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=2)
    big = FlatContribution(torch.full((41,), 3e38), 2, {})
    assert huge.submit(0, 0, big) == "pending" and huge.submit(0, 1, big) == "rejected"  # finite parts, inf sum
    assert huge.rejected == 2 and huge.submit(0, 0, part(0, 2)) == "pending"  # both are awaited again


def test_an_update_that_makes_phi_non_finite_raises_and_the_store_can_never_be_saved_or_used_again():
    store = ParameterStore(params(), sgd(1e10), meta_batch=1)
    with pytest.raises(NonFiniteError, match="non-finite updated Φ at step 0"):
        store.submit(0, 0, FlatContribution(torch.full((41,), 1e30), 1, {}))
    assert store.version == 0
    with pytest.raises(NonFiniteError, match="non-finite updated Φ at step 0"):
        store.state_dict()  # so no checkpoint can hold it
    with pytest.raises(NonFiniteError, match="non-finite updated Φ at step 0"):
        store.submit(0, 0, part(0, 1))
    overflowing = ParameterStore(params(), sgd(1e10), meta_batch=1)  # every value finite, conv.weight's sum not
    grad = torch.cat([torch.full((36,), 3e28), torch.zeros(5)])
    with pytest.raises(NonFiniteError, match="non-finite updated Φ at step 0 in conv.weight;"):
        overflowing.submit(0, 0, FlatContribution(grad, 1, {}))


def test_async_applies_a_meta_batch_of_arrivals_and_drops_too_stale_ones():
    store = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=2, mode="async", staleness=1)
    assert [store.ticket() for _ in range(3)] == [(0, 0), (0, 1), (1, 0)]
    assert store.submit(0, 1, part(0, 2)) == "pending"
    assert store.submit(0, 0, part(1, 2)) == "applied"  # version 1 now
    assert store.submit(0, 0, part(2, 2)) == "pending"  # one version old: allowed
    assert store.submit(1, 1, part(3, 2)) == "applied"  # version 2
    assert store.submit(0, 1, part(4, 2)) == "stale"  # two versions old: dropped
    assert store.stale == 1 and store.version == 2


def test_state_dict_continues_exactly():
    store = ParameterStore(params(), adam(1e-2), meta_batch=2, slices=1)
    store.submit(0, 0, part(0, 2))
    resumed = ParameterStore(params(seed=9), adam(1e-2), meta_batch=2, slices=1, state=store.state_dict())
    for s in (store, resumed):
        s.submit(1, 0, part(1, 2))
    assert torch.equal(store.flat, resumed.flat) and resumed.version == 2
    assert store.state_dict()["sampler"] == {"next_step": 2, "next_ticket_step": 2}


def test_a_checkpoint_of_another_model_is_refused_not_reshaped():
    state = ParameterStore(params(), adam(1e-2), meta_batch=2).state_dict()
    transposed = {**state, "phi": {**state["phi"], "conv.weight": state["phi"]["conv.weight"].reshape(3, 4, 3)}}
    with pytest.raises(ValueError, match=r"conv.weight is \(3, 4, 3\), the model's is \(4, 3, 3\)"):
        ParameterStore(params(), adam(1e-2), meta_batch=2, state=transposed)  # same size: a flat copy would pass
    renamed = {**state, "phi": {"head.weight" if n == "head.bias" else n: t for n, t in state["phi"].items()}}
    with pytest.raises(ValueError, match="head.bias missing; head.weight not in the model"):
        ParameterStore(params(), adam(1e-2), meta_batch=2, state=renamed)

def test_async_tickets_resume_at_a_step_boundary_whatever_the_worker_count():
    store = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=2, mode="async")
    handed = [store.ticket() for _ in range(5)]  # steps 0, 0, 1, 1, 2
    assert handed[-1] == (2, 0)
    resumed = ParameterStore(params(), sgd(0.1), meta_batch=4, slices=4, mode="async", state=store.state_dict())
    assert resumed.ticket() == (3, 0)  # step 2 was partly handed out: no task is trained on twice


def test_a_contribution_travels_as_an_out_of_band_buffer_and_arrives_as_a_read_only_view():
    grad = torch.randn(41)
    buffers = []
    data = pickle.dumps(FlatContribution(grad, 3, {"loss": 2.0}), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and grad.numpy().tobytes() not in data  # the data travels beside the pickle
    view = memoryview(buffers[0].raw()).toreadonly()  # what Ray hands back: shared memory, read-only
    arrived = pickle.loads(data, buffers=[view])
    assert torch.equal(arrived.grad_sum, grad) and arrived.num_tasks == 3 and arrived.metrics == {"loss": 2.0}
    assert arrived.grad_sum.data_ptr() == np.frombuffer(view, dtype=np.uint8).ctypes.data  # no copy
    store = ParameterStore(params(), sgd(0.1), meta_batch=6, slices=2)
    assert store.submit(0, 0, arrived) == "pending" and store.submit(0, 1, arrived) == "applied"  # never written
    assert torch.equal(arrived.grad_sum, grad)


def test_bf16_slices_travel_in_half_the_bytes_and_are_summed_in_float32():
    parts = [part(seed, 2) for seed in range(3)]
    halves = [p._replace(grad_sum=p.grad_sum.to(torch.bfloat16)) for p in parts]
    buffers = []
    data = pickle.dumps(halves[0], protocol=5, buffer_callback=buffers.append)
    arrived = pickle.loads(data, buffers=[b.raw() for b in buffers])
    assert buffers[0].raw().nbytes == 2 * 41 and arrived.grad_sum.dtype == torch.bfloat16
    assert torch.equal(arrived.grad_sum, halves[0].grad_sum)
    by_wire = ParameterStore(params(), sgd(0.1), meta_batch=6, slices=3)
    upcast = ParameterStore(params(), sgd(0.1), meta_batch=6, slices=3)
    for index, (half, pre) in enumerate(zip([arrived, *halves[1:]], halves)):
        by_wire.submit(0, index, half)
        upcast.submit(0, index, pre._replace(grad_sum=pre.grad_sum.float()))
    assert by_wire.flat.dtype == torch.float32 and torch.equal(by_wire.flat, upcast.flat)


def test_phi_kept_in_an_outside_buffer_is_updated_there_with_the_same_arithmetic():
    store, twin = (ParameterStore(params(), adam(0.01), meta_batch=4, slices=2) for _ in range(2))
    buffer = torch.empty_like(store.flat)
    store.keep_phi_in(buffer)
    for step in range(3):
        for s in (store, twin):
            s.submit(step, 0, part(2 * step, 2)), s.submit(step, 1, part(2 * step + 1, 2))
    assert store.flat.data_ptr() == buffer.data_ptr() and torch.equal(buffer, twin.flat)


@pytest.mark.parametrize("optimizer", [adam(0.01), sgd(0.1)], ids=["adam", "sgd"])
def test_a_step_applies_the_mean_of_its_slices_to_the_bit(optimizer):
    store = ParameterStore(params(), optimizer, meta_batch=6, slices=3)
    for i in range(3):
        store.submit(0, i, part(i, 2))  # the optimizer divides the sum in its own pass
    flat = FlatLayout.of(params()).flatten(params())
    mean = (part(0, 2).grad_sum + part(1, 2).grad_sum + part(2, 2).grad_sum) / 6
    expected, _ = optimizer.update({"phi": flat}, {"phi": mean}, optimizer.init({"phi": flat}))
    assert torch.equal(store.flat, expected["phi"])
