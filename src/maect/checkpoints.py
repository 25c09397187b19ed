"""Load ViT encoders from any supported checkpoint format; export our own.

Supported inputs to :func:`load_encoder`:
- a maect run directory (its ``encoder.pt``, else ``checkpoints/last.ckpt``);
- maect ``encoder.pt`` files (``{"model": timm state dict, "arch": {...}}``);
- Lightning checkpoints written by maect (``{"state_dict": {"encoder.…": …}}``);
- facebookresearch/mae checkpoints (``{"model": …}``, ``pos_embed`` with a CLS slot, decoder keys);
- MAE-CT ``.th`` files (``{"state_dict": …, "ctor_kwargs": …}``, ``pos_embed`` without CLS slot);
- timm state dicts (plain ``{name: tensor}``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from maect.models.vit import MaskedViT, ViTArch

# Heads of the standard ViT widths (head width 64 except ViT-H/g/G).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
PREFIXES = ("module.", "encoder.", "backbone.", "model.")
IGNORED_PREFIXES = (
    "decoder",
    "mask_token",
    "head.",
    "fc_norm.",
    "autoencoder.",
    "projector",
    "predictor",
    "target_",
    "queue",
    "ema_",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be read as a ViT encoder; the message says why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is unchanged."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``<name>.tmp`` in the same folder, fsync, then rename over ``<name>``:
    the previous file under that name stays intact until the new one is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports some write failures as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            f"could not write {path} ({err}); the previous file under that name is unchanged"
        ) from err
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _read(source: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """Load the raw object behind ``source`` and a name for error messages."""
    if isinstance(source, Mapping):
        return source, "<state dict>"
    path = Path(source)
    if path.is_dir():
        for candidate in (path / "encoder.pt", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise CheckpointError(
                f"{source} is a directory without encoder.pt or checkpoints/last.ckpt "
                "(is it a maect run directory whose training has not started?)"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj, str(path)


def _state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The encoder's tensors (prefixes stripped, decoder/head keys dropped) and saved arch."""
    arch = obj.get("arch") if isinstance(obj.get("arch"), Mapping) else None
    for key in ("model", "state_dict", "encoder"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    clean: dict[str, torch.Tensor] = {}
    lightning_encoder = any(k.startswith("encoder.") for k in obj)
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        if lightning_encoder and not key.startswith("encoder."):
            continue
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(IGNORED_PREFIXES):
            continue
        clean[key] = value
    return clean, arch


def infer_arch(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> ViTArch:
    """Rebuild the architecture from weight shapes. The head count is not in the weights: it
    comes from ``num_heads``, else the standard width table, else width / 64."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(
            "not a ViT encoder state dict: missing patch_embed.proj.weight or pos_embed "
            f"(found keys like {sorted(state)[:5]})"
        )
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid != tokens - 1:
        grid = int(round(tokens**0.5))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * embed_dim
    heads = num_heads or HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
    return ViTArch(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )


def load_encoder(source: str | Path | Mapping[str, Any], num_heads: int | None = None) -> MaskedViT:
    """Load a ViT encoder (a ``timm.models.VisionTransformer``) from a run directory, a
    checkpoint file or a state dict; the architecture is inferred from the weights.

    ``forward_features(x)`` of the result returns the normed tokens ``[B, 1 + N, D]``.
    """
    obj, name = _read(source)
    state, saved_arch = _state_dict(obj)
    if saved_arch is not None:
        arch = ViTArch(**saved_arch)
    else:
        try:
            arch = infer_arch(state, num_heads)
        except CheckpointError as err:
            raise CheckpointError(f"{name}: {err}") from None
    if "pos_embed" in state and state["pos_embed"].shape[1] == arch.num_patches:
        cls_slot = state["pos_embed"].new_zeros(1, 1, arch.embed_dim)  # MAE-CT: no CLS slot
        state["pos_embed"] = torch.cat([cls_slot, state["pos_embed"]], dim=1)
    encoder = MaskedViT(arch)
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: weights do not fit {arch}: {err}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{name}: weights do not fit the inferred {arch}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return encoder.eval()


def save_encoder(encoder: MaskedViT, path: Path) -> None:
    """Write ``{"model": timm state dict, "arch": ...}`` (timm's ``load_checkpoint`` reads it)."""
    atomic_save({"model": encoder.state_dict(), "arch": dataclasses.asdict(encoder.arch)}, path)
