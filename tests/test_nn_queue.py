"""The nearest-neighbour queue: FIFO, self-exclusion, top-k sampling, checkpointing."""

import math

import pytest
import torch
import torch.nn.functional as F

from maect.models.nn_queue import NNQueue


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_init_is_normalised_seeded_and_empty() -> None:
    queue = NNQueue(size=16, dim=8, seed=3)
    torch.testing.assert_close(queue.embeddings.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(queue.embeddings, NNQueue(size=16, dim=8, seed=3).embeddings)
    assert not torch.equal(queue.embeddings, NNQueue(size=16, dim=8, seed=4).embeddings)
    assert (queue.ids == -1).all() and (queue.labels == -1).all()
    assert queue.ptr.item() == 0 and queue.ptr.dtype == torch.long


def test_fifo_order_and_wrap_around() -> None:
    queue = NNQueue(size=6, dim=4)
    batches = [_unit(2, 4, seed) for seed in range(4)]
    for step, batch in enumerate(batches[:3]):
        queue.update(batch, ids=torch.tensor([2 * step, 2 * step + 1]))
    torch.testing.assert_close(queue.embeddings, torch.cat(batches[:3]))
    assert queue.ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert queue.ptr.item() == 0

    queue.update(batches[3], ids=torch.tensor([6, 7]), labels=torch.tensor([1, 2]))
    torch.testing.assert_close(queue.embeddings, torch.cat([batches[3], *batches[1:3]]))
    assert queue.ids.tolist() == [6, 7, 2, 3, 4, 5]
    assert queue.labels.tolist() == [1, 2, -1, -1, -1, -1]
    assert queue.ptr.item() == 2


def test_size_not_multiple_of_batch_raises() -> None:
    queue = NNQueue(size=8192, dim=4)
    message = "queue size 8192 is not a multiple of the global batch 300"
    with pytest.raises(ValueError, match=message):
        queue.update(_unit(300, 4, 0), ids=torch.arange(300))


def test_exact_nearest_neighbour() -> None:
    queue = NNQueue(size=8, dim=4)
    entries = _unit(8, 4, seed=1)
    queue.update(entries, ids=torch.arange(8))
    queries = F.normalize(entries[[5, 2]] + 0.01 * _unit(2, 4, seed=2), dim=1)
    nn, index = queue.find_nn(queries)
    assert index.tolist() == [5, 2]
    torch.testing.assert_close(nn, entries[[5, 2]])


def test_self_is_excluded() -> None:
    queue = NNQueue(size=8, dim=4)
    entries = _unit(8, 4, seed=1)
    queue.update(entries, ids=torch.arange(10, 18))
    queries = entries[[3, 6]]
    _, index = queue.find_nn(queries)
    assert index.tolist() == [3, 6]
    _, index = queue.find_nn(queries, ids=torch.tensor([13, 16]))
    similarity = queries @ entries.T
    similarity[0, 3] = similarity[1, 6] = -math.inf
    assert index.tolist() == similarity.argmax(dim=1).tolist()
    assert index[0] != 3 and index[1] != 6


def test_topk_picks_only_among_topk_and_covers_them() -> None:
    queue = NNQueue(size=32, dim=8)
    queue.update(_unit(32, 8, seed=5), ids=torch.arange(32))
    query = _unit(1, 8, seed=6).expand(2000, 8)
    allowed = set((query[:1] @ queue.embeddings.T).topk(4, dim=1).indices[0].tolist())
    generator = torch.Generator().manual_seed(0)
    nn, index = queue.find_nn(query, topk=4, generator=generator)
    picked = set(index.tolist())
    assert picked == allowed
    torch.testing.assert_close(nn, queue.embeddings[index])
    counts = torch.bincount(index, minlength=32)[sorted(allowed)].float()
    assert (counts / len(index) - 0.25).abs().max() < 0.05

    repeat = queue.find_nn(query, topk=4, generator=torch.Generator().manual_seed(0))[1]
    assert torch.equal(index, repeat)


def test_nn_label_accuracy_ignores_unknown_labels() -> None:
    queue = NNQueue(size=4, dim=2)
    queue.update(_unit(2, 2, 0), ids=torch.tensor([0, 1]), labels=torch.tensor([7, 8]))
    nn_index = torch.tensor([0, 1, 0, 2, 1])
    labels = torch.tensor([7, 7, -1, 7, 8])
    assert queue.nn_label_accuracy(nn_index, labels).item() == pytest.approx(2 / 3)
    assert math.isnan(queue.nn_label_accuracy(torch.tensor([3]), torch.tensor([1])).item())


def test_state_dict_round_trip() -> None:
    queue = NNQueue(size=8, dim=4, seed=0)
    queue.update(_unit(4, 4, 1), ids=torch.arange(4), labels=torch.arange(4) % 2)
    state = queue.state_dict()
    assert set(state) == {"embeddings", "ids", "labels", "ptr"}

    restored = NNQueue(size=8, dim=4, seed=99)
    restored.load_state_dict(state)
    for name, tensor in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.ptr.item() == 4


def test_no_gradient_through_queue() -> None:
    queue = NNQueue(size=4, dim=4)
    z = _unit(4, 4, 2).requires_grad_(True)
    queue.update(z, ids=torch.arange(4))
    nn, _ = queue.find_nn(z)
    assert not nn.requires_grad and not queue.embeddings.requires_grad
