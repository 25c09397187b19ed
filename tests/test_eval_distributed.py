"""Feature extraction and ``maect evaluate`` shared by 2 gloo ranks equal one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from maect.cli import main
from maect.data.datasets import TensorImageDataset, make_synthetic
from maect.data.transforms import eval_transform
from maect.distributed import init_from_env, rank
from maect.evaluation.features import (
    FeatureKey,
    cached_features,
    extract_features,
    extract_layer_features,
)
from maect.models.vit import MaskedViT, ViTArch
from tests.conftest import free_port, rank_environment

pytestmark = pytest.mark.slow  # two spawned processes, ~20 s

WORLD = 2
UNREADABLE = 5  # an image no rank can read: absent from every result, as in one process
EVAL = [
    "data=synthetic",
    "protocols=knn,cluster,robustness",
    "robustness.corruptions=fog,gaussian_noise",
    "robustness.severities=2",
    "robustness.test_subset=10",
    "linear.epochs=2",
    "plot=false",
    "progress=false",
]


class PartlyUnreadable(TensorImageDataset):
    def load_image(self, index: int) -> torch.Tensor | None:
        return None if index == UNREADABLE else super().load_image(index)


def dataset(size: int = 23) -> PartlyUnreadable:
    base = make_synthetic(size, True)  # 23, odd: the two shards differ in length
    data = PartlyUnreadable(base.images, base.labels, base.num_classes)
    data.transform = eval_transform(28, 1, (0.5,), (0.25,))
    return data


def encoder() -> MaskedViT:
    torch.manual_seed(0)
    return MaskedViT(ViTArch(28, 4, in_chans=1, embed_dim=32, depth=2, num_heads=2))


KEY = FeatureKey("w", "synthetic", "", "train", "all", "eval", "cls", None)


def _worker(local_rank: int, port: int, out: str) -> None:
    rank_environment(local_rank, WORLD, port)
    os.environ["MAECT_CACHE"] = str(Path(out) / "cache")
    torch.set_num_threads(1)
    assert init_from_env() and rank() == local_rank
    model, data = encoder(), dataset()
    results = {"shared": extract_features(model, data, batch_size=4, progress=False, shard=True)}
    cache = Path(out) / "features"
    for name in ("miss", "hit"):
        results[name] = cached_features(
            model, data, KEY, cache, batch_size=4, progress=False, shard=True
        )
    # one image: rank 1's share is empty; rank 0 alone, unsharded (the k-NN monitor's call)
    results["tiny"] = extract_features(model, dataset(1), progress=False, shard=True)
    layers = [0, 1, None]
    results["blocks"] = extract_layer_features(model, data, "cls", layers, 4, shard=True)[0]
    if local_rank == 0:
        results["local"] = extract_features(model, data, batch_size=4, progress=False)
        results["local_blocks"] = extract_layer_features(model, data, "cls", layers, 4)[0]
    main(["evaluate", "pixels", f"out={Path(out) / 'pixels'}", *EVAL])  # joins this group
    torch.distributed.destroy_process_group()
    torch.save(results, Path(out) / f"rank{local_rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("eval_ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_rank_zero_gets_all_features_in_dataset_order(ranks):
    _, (rank0, rank1) = ranks
    features, labels = extract_features(encoder(), dataset(), batch_size=4, progress=False)
    all_labels = make_synthetic(23, True).labels.long()
    assert torch.equal(labels, torch.cat([all_labels[:UNREADABLE], all_labels[UNREADABLE + 1 :]]))
    for name in ("shared", "miss", "hit", "local"):
        got_features, got_labels = rank0[name]
        torch.testing.assert_close(got_features, features, rtol=1e-5, atol=1e-6)
        assert torch.equal(got_labels, labels), name
    for name in ("shared", "miss", "hit"):
        assert rank1[name][0].shape[0] == 0 and rank1[name][1].shape == (0,), name
    # the blocks of one forward pass, sharded: what one process extracts, block by block
    for shared, local in zip(rank0["blocks"], rank0["local_blocks"], strict=True):
        torch.testing.assert_close(shared, local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0["blocks"][2], features, rtol=1e-5, atol=1e-6)
    assert all(block.shape[0] == 0 for block in rank1["blocks"])


def test_a_rank_without_images_does_not_block(ranks):
    _, (rank0, rank1) = ranks
    features, labels = extract_features(encoder(), dataset(1), progress=False)
    torch.testing.assert_close(rank0["tiny"][0], features, rtol=1e-5, atol=1e-6)
    assert torch.equal(rank0["tiny"][1], labels) and rank1["tiny"][0].shape == (0, 32)


def test_rank_zero_alone_writes_the_cache(ranks):
    out, _ = ranks
    assert len(list((out / "features").glob("*.pt"))) == 1
    assert not list((out / "features").glob("*.tmp"))


def test_cli_under_two_ranks_writes_what_one_process_writes(ranks, tmp_path, monkeypatch):
    out, _ = ranks
    shared = (out / "pixels" / "eval.json").read_text()
    monkeypatch.setenv("MAECT_CACHE", str(tmp_path / "cache"))
    main(["evaluate", "pixels", f"out={tmp_path / 'pixels'}", *EVAL])
    single = (tmp_path / "pixels" / "eval.json").read_text()

    def headline(text: str) -> dict:
        data = json.loads(text)
        return {k: data[k] for k in ("knn", "cluster", "robustness")} | {
            "n": data["features"]["n_train"]
        }

    assert headline(shared) == headline(single)
