"""The translation Transformer as pure functions: paths agree, padding is inert, it memorises
a pair exactly, and first-order MAML runs on real language tasks."""
from __future__ import annotations

import pytest
import torch

from distmeta.algorithms import InnerLoop, build_algorithm, compute_contribution
from distmeta.algorithms.inner import expand_to_tasks
from distmeta.data.translation import BOS, EOS, PAD
from distmeta.models.transformer import TransformerSize, beam_search, greedy_decode, make_transformer
from distmeta.optim import adam
from distmeta.types import TaskBatch

SIZE = TransformerSize(vocab=40, dim=32, heads=4, ffn=64, encoder_layers=1, decoder_layers=1)


def random_tasks(tasks: int, pairs: int, generator: torch.Generator) -> TaskBatch:
    """Tasks of padded pairs: ids 4..39, random lengths, bos/eos around targets."""
    def side(length: int, target: bool) -> torch.Tensor:
        ids = torch.full((tasks, pairs, length + 2), PAD)
        for t in range(tasks):
            for p in range(pairs):
                n = int(torch.randint(1, length + 1, (1,), generator=generator))
                body = torch.randint(4, 40, (n,), generator=generator)
                ids[t, p, :n + 2 * target] = torch.cat([torch.tensor([BOS]), body, torch.tensor([EOS])]) if target \
                    else body
        return ids
    return TaskBatch((side(7, False), side(6, True)), (side(7, False), side(6, True)))


def test_batched_loss_equals_the_per_task_loss_and_ignores_padding():
    model = make_transformer(SIZE)
    phi = model.init(torch.Generator().manual_seed(0))
    tasks = random_tasks(3, 4, torch.Generator().manual_seed(1))
    losses, metrics = model.batched_loss(expand_to_tasks(phi, 3), tasks.query)
    for t in range(3):
        single, single_metrics = model.loss(phi, (tasks.query[0][t], tasks.query[1][t]))
        assert torch.allclose(losses[t], single, atol=1e-5)
        src, tgt = tasks.query[0][t], tasks.query[1][t]
        wider = (torch.cat([src, torch.full((4, 3), PAD)], 1), torch.cat([tgt, torch.full((4, 2), PAD)], 1))
        assert torch.allclose(model.loss(phi, wider)[0], single, atol=1e-5)  # more padding, same loss
        assert single_metrics["tokens"] == (tgt[:, 1:] != PAD).sum()
    padded = (torch.cat([src, torch.full((2, src.shape[1]), PAD)]), torch.cat([tgt, torch.full((2, tgt.shape[1]), PAD)]))
    grads = torch.func.grad(lambda p: model.loss(p, padded)[0])(phi)  # all-pad pairs, as a short task has
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert torch.allclose(model.loss(phi, padded)[0], model.loss(phi, (src, tgt))[0], atol=1e-5)


def test_it_memorises_a_pair_and_greedy_decoding_reproduces_it_exactly():
    model = make_transformer(SIZE)
    phi = model.init(torch.Generator().manual_seed(2))
    src = torch.tensor([[5, 9, 11, 7, PAD]])
    tgt = torch.tensor([[BOS, 20, 21, 8, 30, 31, EOS]])
    optimizer = adam(3e-3)
    state = optimizer.init(phi)
    gradient = torch.func.grad(lambda p: model.loss(p, (src, tgt))[0])
    for _ in range(300):
        phi, state = optimizer.update(phi, gradient(phi), state)
    decoded = greedy_decode(phi, SIZE, src, max_len=10)
    assert decoded[0].tolist() == tgt[0].tolist()
    assert beam_search(phi, SIZE, src, beam=4, max_len=10)[0].tolist() == tgt[0].tolist()


def test_a_beam_of_one_is_greedy_decoding():
    model = make_transformer(SIZE)
    phi = model.init(torch.Generator().manual_seed(5))
    src = random_tasks(1, 4, torch.Generator().manual_seed(6)).support[0][0]
    greedy, beam = greedy_decode(phi, SIZE, src, max_len=8), beam_search(phi, SIZE, src, beam=1, max_len=8)
    for g, b in zip(greedy, beam):
        assert g[g != PAD].tolist() == b[b != PAD].tolist()


@pytest.mark.parametrize("inner", [InnerLoop(lr=0.1, steps=2), InnerLoop(lr=0.01, steps=2, optimizer="adam")],
                         ids=["sgd", "adam"])
def test_first_order_maml_on_translation_tasks_matches_the_loop_and_is_finite(inner):
    """Adam included: the embedding rows of tokens no task uses get exactly zero gradients."""
    model = make_transformer(SIZE)
    phi = model.init(torch.Generator().manual_seed(3))
    tasks = random_tasks(2, 3, torch.Generator().manual_seed(4))
    fomaml = build_algorithm("fomaml", inner)
    fast, slow = (compute_contribution(fomaml, model, phi, tasks, path) for path in ("vmap", "loop"))
    assert fast.num_tasks == 2
    for name, value in fast.grad_sum.items():
        assert torch.isfinite(value).all() and torch.allclose(value, slow.grad_sum[name], atol=1e-5), name
