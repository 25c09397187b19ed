"""Frozen-encoder feature extraction, train-statistics standardisation and an on-disk cache.

:func:`extract_features` runs an encoder over a dataset (batched, no gradient, bf16 autocast on
GPU) and pools its tokens into one vector per image; :func:`extract_layer_features` does so for
several blocks in one forward pass. :func:`cached_features` / :func:`cached_layer_features` wrap
them with a cache keyed by a :class:`FeatureKey` (weights, dataset, split, subset, transform,
pooling, layer), one file per layer, so that the protocols of one ``maect evaluate`` call, and
later calls, extract only once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from maect.atomic import atomic_write
from maect.data.loader import build_loader
from maect.distributed import rank, world_size
from maect.evaluation.distributed import gather_rows_to_zero
from maect.models.cpu_linear import cpu_matmul as routed
from maect.models.pooling import pool_tokens

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored layout or the extraction semantics change


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: the first GPU if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def block_index(encoder: VisionTransformer, layer: int) -> int:
    """The 0-based index of block ``layer`` (negative counts from the end).

    Raises:
        ValueError: If ``layer`` is out of range for the encoder's depth.
    """
    depth = len(encoder.blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer={layer} is out of range for an encoder with {depth} blocks")
    return layer % depth


def encode_layers(
    encoder: VisionTransformer | None,
    images: torch.Tensor,
    pooling: str = "cls",
    layers: Sequence[int | None] = (None,),
) -> list[torch.Tensor]:
    """Pooled features ``[B, D]`` of several blocks of a batch of normalised images, from ONE
    forward pass.

    Every block's tokens go through the encoder's final norm before pooling (timm's
    ``forward_intermediates(norm=True)``, which runs the blocks once and keeps the requested
    outputs), so ``None`` (the output of ``forward_features``) equals the last block.

    Args:
        encoder: A timm ViT; ``None`` returns the flattened pixels for every entry of ``layers``.
        images: Normalised images ``[B, C, H, W]`` on the encoder's device.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean`` (concatenated).
        layers: Block indices (0-based, negative from the end); ``None`` is the final norm.

    Returns:
        One ``[B, D]`` tensor per entry of ``layers``, in that order.
    """
    if encoder is None:
        return [images.flatten(1)] * len(layers)
    if all(layer is None for layer in layers):
        return [pool_tokens(encoder.forward_features(images), pooling)] * len(layers)
    depth = len(encoder.blocks)
    index = [depth - 1 if layer is None else block_index(encoder, layer) for layer in layers]
    taken = sorted(set(index))  # forward_intermediates returns them in block order
    outputs = encoder.forward_intermediates(
        images,
        indices=taken,
        return_prefix_tokens=True,
        norm=True,
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    pooled = {
        block: pool_tokens(torch.cat([prefix, patches], dim=1), pooling)
        for block, (patches, prefix) in zip(taken, outputs, strict=True)
    }
    return [pooled[block] for block in index]


def encode(
    encoder: VisionTransformer | None,
    images: torch.Tensor,
    pooling: str = "cls",
    layer: int | None = None,
) -> torch.Tensor:
    """Pooled features ``[B, D]`` of a batch of normalised images.

    Args:
        encoder: A timm ViT; ``None`` returns the flattened pixels (``pooling``/``layer`` unused).
        images: Normalised images ``[B, C, H, W]`` on the encoder's device.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean`` (concatenated).
        layer: ``None`` pools the output of the final norm (``forward_features``); ``k`` pools the
            output of block ``k`` (0-based, negative counts from the end) after the encoder's
            final norm, so ``layer=-1`` equals the default (:func:`encode_layers`).
    """
    return encode_layers(encoder, images, pooling, (layer,))[0]


def extract_features(
    encoder: VisionTransformer | None,
    dataset: Dataset,
    pooling: str = "cls",
    layer: int | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every readable image of ``dataset``, in dataset order: the one-layer
    case of :func:`extract_layer_features` (``layer``: see :func:`encode`), which takes
    ``options`` (batch_size, device, num_workers, progress, desc, shard, cpu_matmul).

    Returns:
        ``(features [N, D] float32 on the CPU, labels [N] int64)``.
    """
    (features,), labels = extract_layer_features(encoder, dataset, pooling, (layer,), **options)
    return features, labels


def extract_layer_features(
    encoder: VisionTransformer | None,
    dataset: Dataset,
    pooling: str = "cls",
    layers: Sequence[int | None] = (None,),
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "features",
    shard: bool = False,
    cpu_matmul: str = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features of every readable image of ``dataset``, in dataset order, for several
    blocks at once: one forward pass per batch (:func:`encode_layers`), one feature matrix per
    entry of ``layers``.

    The dataset's own ``transform`` must produce the normalised evaluation view. The encoder is
    put in eval mode for the pass and its previous mode restored; images that cannot be read are
    skipped (their rows are absent from the result).

    Args:
        encoder: A timm ViT, or ``None`` for raw normalised pixels flattened.
        dataset: Yields ``(image, label, index)`` (any :class:`maect.data.datasets.ImageDataset`).
        pooling: ``cls``, ``mean`` or ``cls+mean`` (see :func:`encode`).
        layers: Blocks whose outputs are pooled (see :func:`encode`); ``None`` for the last.
        batch_size: Images per forward pass.
        device: Where the encoder runs; ``None`` picks the GPU if available. bf16 autocast on GPU.
        num_workers: Data loader workers.
        progress: Show a tqdm progress bar.
        desc: Label of the progress bar.
        shard: In a process group, share the work: rank ``r`` encodes images ``r, r + W, ...``
            and rank 0 receives all rows in dataset order (the others get empty tensors). Every
            rank must make the call.
        cpu_matmul: On CPU, the encoder's float32 linear layers run through oneDNN for the pass
            (``auto``: on AMD processors, as ``trainer.cpu_matmul``; ``onednn``; ``default``).

    Returns:
        ``([features [N, D] float32 CPU per layer], labels [N] int64)``.
    """
    device = resolve_device(device)
    world = world_size() if shard else 1
    part = dataset if world == 1 else Subset(dataset, range(rank(), len(dataset), world))
    loader = build_loader(part, batch_size, num_workers, shuffle=False, drop_last=False)
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval().to(device)
    features, labels, indices = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    matmul = contextlib.nullcontext() if encoder is None else routed(encoder, cpu_matmul, device)
    try:
        with torch.inference_mode(), autocast, matmul:
            for batch in tqdm(loader, desc=desc, disable=not progress or rank() != 0, leave=False):
                images = batch["image"].to(device, non_blocking=True)
                pooled = encode_layers(encoder, images, pooling, layers)
                features.append(torch.cat(pooled, dim=1).float().cpu())
                labels.append(batch["label"])
                indices.append(batch["index"])
    finally:
        if encoder is not None:
            encoder.train(was_training)
    if world > 1:
        if not features:  # this rank's share is empty or unreadable
            features, labels, indices = [torch.empty(0, 0)], [torch.empty(0)], [torch.empty(0)]
        rows, row_labels = gather_rows_to_zero(
            torch.cat(features), torch.cat(labels), torch.cat(indices)
        )
    else:
        rows, row_labels = torch.cat(features), torch.cat(labels).long()
    return [part.contiguous() for part in rows.tensor_split(len(layers), dim=1)], row_labels


def standardize(
    train_x: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, ...]:
    """Standardise every feature with the mean and std of ``train_x`` (applied to all inputs).

    Returns:
        ``(train_x, *others)`` standardised, in the order given.
    """
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False) + eps
    return tuple((x - mean) / std for x in (train_x, *others))


# --------------------------------------------------------------------------- cache


def weights_fingerprint(source: str | Path | Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """A short hash identifying encoder weights.

    A file (or a run directory, through its ``encoder.pt`` / ``checkpoints/last.ckpt``) is
    identified by its resolved path, size and modification time, which costs no reading; a
    state dict or module by the bytes of its tensors.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            candidates = [path / "encoder.pt", path / "checkpoints" / "last.ckpt"]
            path = next((c for c in candidates if c.is_file()), path)
        stat = path.stat()
        text = f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines a feature matrix; its :meth:`digest` names the cache file.

    Attributes:
        weights: :func:`weights_fingerprint` of the encoder, or ``"pixels"``.
        dataset: Dataset name.
        root: Dataset root folder (``""`` for the default location).
        split: ``train`` or ``test``.
        subset: Description of the sample selection, e.g. ``"all"`` or ``"balanced:1000:seed0"``.
        transform: Description of the evaluation transform (size, channels, normalisation).
        pooling: Token pooling.
        layer: Block index, or ``None`` for the final norm.
    """

    weights: str
    dataset: str
    root: str
    split: str
    subset: str
    transform: str
    pooling: str
    layer: int | None

    def digest(self) -> str:
        """Hash of all fields (and of the cache format)."""
        payload = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def filename(self) -> str:
        """``<split>-<pooling>[-l<layer>]-<digest>.pt``."""
        layer = "" if self.layer is None else f"-l{self.layer}"
        return f"{self.split}-{self.pooling.replace('+', '_')}{layer}-{self.digest()}.pt"


def default_cache_dir(source: str | Path | None = None) -> Path:
    """``<run_dir>/features`` for a run directory; else ``$MAECT_CACHE/features``, defaulting to
    ``~/.cache/maect/features``."""
    if source is not None and Path(source).is_dir():
        return Path(source) / "features"
    root = os.environ.get("MAECT_CACHE") or Path.home() / ".cache" / "maect"
    return Path(root) / "features"


def _read_cache(path: Path, key: FeatureKey) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored ``(features, labels)`` of ``key`` at ``path``, or ``None`` (absent, unreadable,
    or another key)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") != dataclasses.asdict(key):
            return None
    except Exception as err:  # noqa: BLE001 - any unreadable file means: extract again
        log.warning("ignoring unreadable feature cache %s: %s", path, err)
        return None
    log.info("features from cache %s", path)
    return stored["features"], stored["labels"]


def cached_features(
    encoder: VisionTransformer | None,
    dataset: Dataset,
    key: FeatureKey,
    cache_dir: Path | None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` through an on-disk cache in ``cache_dir`` (``None``: no cache):
    the one-key case of :func:`cached_layer_features`, which takes ``options`` (batch_size,
    device, num_workers, progress, shard).

    Returns:
        ``(features [N, D] float32 CPU, labels [N] int64)``, identical to a fresh extraction.
    """
    (features,), labels = cached_layer_features(encoder, dataset, [key], cache_dir, **options)
    return features, labels


def cached_layer_features(
    encoder: VisionTransformer | None,
    dataset: Dataset,
    keys: Sequence[FeatureKey],
    cache_dir: Path | None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    shard: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`extract_layer_features` through an on-disk cache in ``cache_dir`` (``None``: no
    cache), for several keys that differ only in ``layer``: each is read from the cache where
    stored, the missing ones come from ONE extraction pass and are stored one file per layer.

    The caller guarantees that each key describes ``encoder`` and ``dataset`` (with its
    transform); ``key.pooling`` and ``key.layer`` select the pooling. A stored file whose key
    differs (a hash collision, or a file from elsewhere) is ignored and overwritten.

    With ``shard`` in a process group (every rank calls), rank 0 alone reads and writes the cache
    and receives the features; on a miss all ranks share the extraction
    (``extract_layer_features``'s ``shard``); the other ranks get empty tensors.

    Returns:
        ``([features [N, D] float32 CPU per key], labels [N] int64)``.
    """
    if len({dataclasses.replace(key, layer=None) for key in keys}) > 1:
        raise ValueError("cached_layer_features: the keys may differ only in their layer")
    sharded = shard and world_size() > 1
    owns_cache = cache_dir is not None and (not sharded or rank() == 0)
    paths = [cache_dir / key.filename() if cache_dir is not None else None for key in keys]
    stored = [_read_cache(p, k) if owns_cache else None for p, k in zip(paths, keys, strict=True)]
    missing = [i for i, hit in enumerate(stored) if hit is None]
    if sharded:
        shared = [missing]
        dist.broadcast_object_list(shared, src=0)
        missing = shared[0]
        if rank() != 0:
            stored = [(torch.empty(0, 0), torch.empty(0, dtype=torch.long))] * len(keys)
    if missing:
        features, labels = extract_layer_features(
            encoder,
            dataset,
            keys[0].pooling,
            [keys[i].layer for i in missing],
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
            desc=f"{keys[0].split} features",
            shard=sharded,
        )
        for i, x in zip(missing, features, strict=True):
            stored[i] = (x, labels)
            if owns_cache:
                payload = {"key": dataclasses.asdict(keys[i]), "features": x, "labels": labels}
                with atomic_write(paths[i]) as f:
                    torch.save(payload, f)
    return [x for x, _ in stored], stored[0][1]
