"""Counter-based task sampling: same counters, same tensors; impossible shapes rejected."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distmeta.data.omniglot import load_omniglot
from distmeta.data.omniglot_tasks import OmniglotTasks
from distmeta.data.sampling import task_rng
from distmeta.data.sinusoid import SinusoidTasks


@pytest.fixture(scope="module")
def omniglot(omniglot_env):
    return load_omniglot()


def test_a_task_is_the_same_whichever_slice_generates_it(omniglot):
    sampler = OmniglotTasks(omniglot, ways=5, shots=1, queries=3, seed=7)
    whole = sampler.sample("train", 11, 0, 8)
    again = OmniglotTasks(omniglot, ways=5, shots=1, queries=3, seed=7).sample("train", 11, 3, 5)
    for part_whole, part_again in zip(whole, again):
        for a, b in zip(part_whole, part_again):
            assert torch.equal(a[3:5], b)


def test_tasks_differ_across_counters_and_seeds(omniglot):
    sampler = OmniglotTasks(omniglot, ways=5, shots=1, queries=3, seed=0)
    base = sampler.sample("train", 0, 0, 1).support[0]
    assert not torch.equal(base, sampler.sample("train", 1, 0, 1).support[0])
    assert not torch.equal(base, sampler.sample("train", 0, 1, 2).support[0])
    assert not torch.equal(base, sampler.sample("val", 0, 0, 1).support[0])
    other_seed = OmniglotTasks(omniglot, ways=5, shots=1, queries=3, seed=1)
    assert not torch.equal(base, other_seed.sample("train", 0, 0, 1).support[0])


def test_task_layout_labels_and_values(omniglot):
    tasks = OmniglotTasks(omniglot, ways=5, shots=2, queries=3).sample("test", 0, 0, 4)
    (xs, ys), (xq, yq) = tasks
    assert xs.shape == (4, 10, 1, 28, 28) and xq.shape == (4, 15, 1, 28, 28)
    assert xs.dtype == torch.float32 and 0.0 <= xs.min() and xs.max() <= 1.0
    assert ys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert yq[0].tolist() == [c for c in range(5) for _ in range(3)]
    # support and query drawings of a class are distinct drawings of the same character
    assert not any(torch.equal(xs[0, 0], xq[0, j]) for j in range(3))


def test_classes_are_characters_times_rotations_and_rotations_rotate(omniglot):
    sampler = OmniglotTasks(omniglot, ways=5, shots=1, queries=1, rotations=(0, 90, 180, 270))
    assert sampler.num_classes("train") == 1100 * 4 and sampler.num_classes("test") == 423 * 4
    character = sampler.characters["train"][0]
    rng = np.random.default_rng(0)
    turned = sampler._drawings("train", 1, rng)  # class 1 = first character turned by 90°
    drawings = omniglot.images[character]
    assert any(np.array_equal(turned[0], np.rot90(d)) for d in drawings)


def test_impossible_task_shapes_are_clear_errors(omniglot):
    with pytest.raises(ValueError, match="only 20 drawings"):
        OmniglotTasks(omniglot, ways=5, shots=10, queries=11)
    with pytest.raises(ValueError, match=r"task.ways = 500 .* val split has only 400 classes"):
        OmniglotTasks(omniglot, ways=500, shots=1, queries=1)


def test_sinusoid_tasks_follow_their_curve():
    sampler = SinusoidTasks(shots=10, queries=5, seed=3)
    (xs, ys), (xq, yq) = sampler.sample("test", 2, 4, 6)
    assert xs.shape == (2, 10, 1) and xq.shape == (2, 5, 1)
    amplitude, phase = sampler.curve("test", 2, 5)
    assert 0.1 <= amplitude <= 5.0 and 0.0 <= phase <= np.pi
    assert torch.allclose(ys[1], amplitude * torch.sin(xs[1] - phase), atol=1e-5)
    assert xs.abs().max() <= 5.0
    assert torch.equal(sampler.sample("test", 2, 5, 6).support[0][0], xs[1])


def test_task_rng_rejects_bad_counters():
    with pytest.raises(ValueError, match="unknown split"):
        task_rng(0, "dev", 0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        task_rng(0, "train", -1, 0)
