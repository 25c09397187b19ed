"""Property tests over random shapes and ratios: masking, patchify, the NN queue, the training
sampler, feature gathering and the evaluation metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from maect.data.loader import EpochShuffleSampler
from maect.evaluation.clustering import ami, ari, cluster_accuracy, nmi
from maect.evaluation.distributed import gather_in_order
from maect.evaluation.knn import knn_accuracy
from maect.models.masking import num_visible, random_masking
from maect.models.nn_queue import NNQueue
from maect.models.patches import patchify, unpatchify

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(
    batch=st.integers(1, 4),
    length=st.integers(1, 64),
    dim=st.integers(1, 8),
    ratio=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_masking_keeps_a_permutation_of_the_tokens(batch, length, dim, ratio, seed):
    tokens = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))
    out = random_masking(tokens, ratio, generator=torch.Generator().manual_seed(seed))
    keep = num_visible(length, ratio)
    assert out.visible.shape == (batch, keep, dim) and 1 <= keep <= length
    assert (out.mask.sum(dim=1) == length - keep).all()
    arange = torch.arange(length).expand(batch, -1)
    shuffle = torch.argsort(out.ids_restore, dim=1)  # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(shuffle, 1, out.ids_restore), arange)
    assert torch.equal(shuffle[:, :keep], out.ids_keep)
    assert torch.equal(
        out.visible, torch.gather(tokens, 1, out.ids_keep[..., None].expand(-1, -1, dim))
    )
    assert (torch.gather(out.mask, 1, out.ids_keep) == 0).all()


@FAST
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 3),
    grid=st.integers(1, 5),
    patch=st.integers(1, 6),
)
def test_patchify_is_invertible_and_row_major(batch, channels, grid, patch):
    size = grid * patch
    images = torch.randn(batch, channels, size, size)
    patches = patchify(images, patch)
    assert patches.shape == (batch, grid * grid, patch * patch * channels)
    assert torch.equal(unpatchify(patches, patch, channels), images)
    row, col = grid - 1, 0  # bottom-left patch, top-left pixel, every channel
    first = patches[:, row * grid + col, :channels]
    assert torch.equal(first, images[:, :, row * patch, col * patch])


@FAST
@given(
    batch=st.integers(1, 6),
    multiple=st.integers(1, 5),
    steps=st.integers(1, 12),
    dim=st.integers(1, 6),
)
def test_queue_holds_the_last_entries_fifo(batch, multiple, steps, dim):
    size = batch * multiple
    queue = NNQueue(size, dim, seed=0)
    written = []
    for step in range(steps):
        z = F.normalize(torch.randn(batch, dim), dim=1)
        ids = torch.arange(batch) + step * batch
        queue.update(z, ids, labels=ids % 3)
        written += list(zip(ids.tolist(), z, strict=True))
    assert int(queue.ptr) == (steps * batch) % size
    recent = written[-size:]
    stored = {int(i): queue.embeddings[k] for k, i in enumerate(queue.ids.tolist()) if i >= 0}
    assert set(stored) == {i for i, _ in recent}
    for i, z in recent:
        assert torch.equal(stored[i], z)
    assert ((queue.labels == queue.ids % 3) | (queue.ids < 0)).all()


@FAST
@given(size=st.integers(2, 20), dim=st.integers(2, 6), queries=st.integers(1, 5))
def test_queue_neighbour_is_the_most_similar_other_sample(size, dim, queries):
    queue = NNQueue(size, dim, seed=1)
    queue.update(F.normalize(torch.randn(size, dim), dim=1), torch.arange(size))
    z = F.normalize(torch.randn(queries, dim), dim=1)
    own = torch.randint(size, (queries,))
    neighbours, index = queue.find_nn(z, own)
    assert (index != own).all()  # never the query's own sample
    similarity = z @ queue.embeddings.T
    similarity[torch.arange(queries), own] = -2.0
    torch.testing.assert_close((z * neighbours).sum(1), similarity.max(dim=1).values)


@FAST
@given(
    length=st.integers(1, 60),
    batch=st.integers(1, 8),
    world=st.integers(1, 4),
    epoch=st.integers(0, 5),
)
def test_sampler_splits_every_global_batch_over_ranks(length, batch, world, epoch):
    import maect.data.loader as loader

    original = loader.world_size, loader.rank
    shards = []
    try:
        for r in range(world):
            loader.world_size, loader.rank = (lambda: world), (lambda r=r: r)
            sampler = EpochShuffleSampler(length, seed=7, batch_size=batch)
            sampler.set_epoch(epoch)
            if length < batch * world:
                return
            shards.append(list(sampler))
    finally:
        loader.world_size, loader.rank = original
    steps = length // (batch * world)
    seen = [
        i for s in range(steps) for shard in shards for i, _ in shard[s * batch : (s + 1) * batch]
    ]
    assert len(seen) == len(set(seen)) == steps * batch * world  # disjoint, none repeated
    assert all(0 <= i < length for i in seen)


@FAST
@given(
    length=st.integers(1, 30),
    dim=st.integers(1, 4),
    extra=st.lists(st.integers(0, 29), max_size=10),
    seed=st.integers(0, 1000),
)
def test_gather_in_order_places_each_row_once(length, dim, extra, seed):
    features = torch.randn(length, dim)
    duplicates = [i for i in extra if i < length]  # like DistributedSampler's padding
    indices = torch.tensor(list(range(length)) + duplicates)
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    out = gather_in_order(features[indices[order]], indices[order], length)
    assert torch.equal(out, features)


label_pairs = st.integers(2, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 5), min_size=n, max_size=n),
        st.lists(st.integers(0, 5), min_size=n, max_size=n),
        st.permutations(list(range(6))),
    )
)


@FAST
@given(label_pairs)
def test_cluster_metrics_are_bounded_symmetric_and_ignore_cluster_names(case):
    y_true, y_pred, perm = (np.asarray(v) for v in case)
    renamed = perm[y_pred]
    for metric in (cluster_accuracy, nmi, ami, ari):
        score = metric(y_true, y_pred)
        assert np.isclose(metric(y_true, renamed), score)
    assert 0.0 <= cluster_accuracy(y_true, y_pred) <= 1.0
    assert -1e-9 <= nmi(y_true, y_pred) <= 1.0 + 1e-9
    for metric in (nmi, ami, ari):
        assert np.isclose(metric(y_true, y_pred), metric(y_pred, y_true))
    for metric in (cluster_accuracy, nmi, ami, ari):
        assert np.isclose(metric(y_true, y_true), 1.0)


@FAST
@given(
    n=st.integers(3, 40),
    classes=st.integers(2, 5),
    k=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_knn_accuracy_is_a_percentage_and_perfect_on_its_own_bank(n, classes, k, seed):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = F.one_hot(y, classes).float() * 10 + 0.01 * torch.randn(n, classes, generator=generator)
    result = knn_accuracy(x, y, x, y, k=min(k, n))
    assert result["top1"] == 100.0
    shuffled = y[torch.randperm(n, generator=generator)]
    assert 0.0 <= knn_accuracy(x, y, x, shuffled, k=min(k, n))["top1"] <= 100.0
