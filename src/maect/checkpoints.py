"""Load ViT encoders from any supported checkpoint format; export our own.

Supported inputs to :func:`load_encoder`:
- a maect run directory (its ``encoder.pt``, else ``checkpoints/last.ckpt``);
- maect ``encoder.pt`` files (``{"model": timm state dict, "arch": {...}}``);
- Lightning checkpoints written by maect (``{"state_dict": {"encoder.…": …}}``);
- facebookresearch/mae checkpoints (``{"model": …}``, ``pos_embed`` with a CLS slot, decoder keys);
- MAE-CT ``.th`` files (``{"state_dict": …, "ctor_kwargs": …}``, ``pos_embed`` without CLS slot);
- timm state dicts (plain ``{name: tensor}``, ``.pth``/``.bin`` or ``.safetensors``).

The weights give every architecture field except the attention-head count. It is taken from the
file when the file records it (maect ``encoder.pt``, maect Lightning checkpoints, MAE-CT
``ctor_kwargs``), else from ``num_heads=`` (the ``model.num_heads`` key of the commands), else from
:data:`HEADS_BY_WIDTH` for the standard ViT widths; any other width is an error that asks for
``model.num_heads``: a wrong guess would silently give another model.

:func:`load_classifier` reads the same formats when they hold a classifier head (``head.*``, and
``fc_norm.*`` for global average pooling): maect ``classifier.pt`` files and fine-tuning run
directories, facebookresearch/mae fine-tuned checkpoints and timm classifier state dicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from maect.atomic import atomic_write, fsync_folder
from maect.models.classifier import ViTClassifier, classifier_record
from maect.models.vit import MaskedViT, ViTArch

# Heads of the standard ViT widths: every class-token ViT of timm 1.x with that width has that head
# count (Ti, xsmall/wee, little, S, medium, betwixt, B, B+, L, SO400M, H/14, g/14, G/14; head width
# 64 up to L). Widths with several head counts in timm (1536: 12, 16 or 24) are left out.
HEADS_BY_WIDTH = {
    192: 3,
    256: 4,
    320: 5,
    384: 6,
    512: 8,
    640: 10,
    768: 12,
    896: 14,
    1024: 16,
    1152: 16,
    1280: 16,
    1408: 16,
    1664: 16,
}
ACCEPTED = (
    "a maect run directory, encoder.pt or Lightning .ckpt, a facebookresearch/mae .pth, an "
    "MAE-CT .th, or a timm state dict (.pth, .bin, .safetensors)"
)
PREFIXES = ("module.", "encoder.", "backbone.", "model.")
HEAD_PREFIXES = ("head.", "fc_norm.")
IGNORED_PREFIXES = (
    "decoder",
    "mask_token",
    *HEAD_PREFIXES,
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
    """``torch.save`` through a uniquely named temporary file in the same folder, fsync, then
    rename over ``path`` (:func:`maect.atomic.atomic_write`): the previous file under that name
    stays intact until the new one is complete."""
    try:
        with atomic_write(path, fsync=True) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch reports some write failures as RuntimeError
        raise CheckpointWriteError(
            f"could not write {path} ({err}); the previous file under that name is unchanged"
        ) from err
    fsync_folder(path.parent)  # make the rename itself durable


ENCODER_FILES = ("encoder.pt", "checkpoints/last.ckpt")
CLASSIFIER_FILES = ("classifier.pt", "checkpoints/last.ckpt")


def _read(
    source: str | Path | Mapping[str, Any],
    run_files: tuple[str, ...] = ENCODER_FILES,
    mmap: bool = False,
) -> tuple[Mapping[str, Any], str]:
    """Load the raw object behind ``source`` (in a run directory: the first of ``run_files``;
    ``mmap``: tensors memory-mapped, not read) and a name for error messages."""
    if isinstance(source, Mapping):
        return source, "<state dict>"
    path = Path(source)
    if path.is_dir():
        for candidate in (path / name for name in run_files):
            if candidate.is_file():
                path = candidate
                break
        else:
            held = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
            holds = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "") or "nothing"
            raise CheckpointError(
                f"{source} is a directory without {' or '.join(run_files)} (it holds {holds}; a "
                f"maect run directory has them once training has started); accepted: {ACCEPTED}"
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), str(path)
        except SafetensorError as err:
            raise CheckpointError(f"{path} is an unreadable safetensors file ({err})") from None
    try:
        # facebookresearch/mae and timm training checkpoints keep their argparse arguments.
        mmap = mmap and zipfile.is_zipfile(path)  # mmap needs the zip format
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        found = _diagnose(path, err)
        raise CheckpointError(f"{path} is not a readable checkpoint: {found}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict; accepted: {ACCEPTED}"
        )
    return obj, str(path)


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header length, then JSON)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _diagnose(path: Path, err: Exception) -> str:
    """What ``path`` holds instead of a loadable checkpoint, and what is accepted."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    if size == 0:
        found = "the file is empty (0 bytes)"
    elif head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            found = f"a zip archive (PyTorch's format) that is truncated or corrupt ({size} bytes)"
        elif refused:
            found = (
                f"it holds a Python object that a weights-only load refuses ({refused.group(1)}); "
                "maect never runs code from a checkpoint: save the state dict alone"
            )
        else:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if not any(n.endswith("data.pkl") for n in names):
                found = f"a zip archive, not a PyTorch checkpoint (holds {names[:3]})"
            else:
                found = f"a PyTorch zip checkpoint that cannot be read ({_first_line(err)})"
    elif head[:1] == b"\x80":
        found = f"a legacy PyTorch pickle, truncated or corrupt ({size} bytes; {_first_line(err)})"
    elif _is_text(head):
        preview = head.decode("utf-8", errors="replace").strip().splitlines()
        found = f"a text file (starts with {preview[0][:40]!r})" if preview else "a blank text file"
    else:
        found = f"an unknown format (first bytes {head[:8].hex(' ')}, {size} bytes)"
    return f"{found}; accepted: {ACCEPTED}"


def _is_text(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) reads as printable UTF-8 text."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end
            return False
        text = head[: err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _state_dict(
    obj: Mapping[str, Any], keep_head: bool = False
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The encoder's tensors (prefixes stripped, decoder keys dropped, head keys too unless
    ``keep_head``) and the saved arch."""
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
        if key.startswith(IGNORED_PREFIXES) and not (keep_head and key.startswith(HEAD_PREFIXES)):
            continue
        clean[key] = value
    return clean, arch


def _lookup(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...``, or ``None`` where a level is missing or not a mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def saved_num_heads(obj: Mapping[str, Any]) -> int | None:
    """The head count a checkpoint records: maect ``encoder.pt`` (``arch``), maect Lightning
    checkpoints (the run config in ``hyper_parameters``), MAE-CT ``.th`` (``ctor_kwargs``)."""
    candidates = (
        _lookup(obj, "arch", "num_heads"),
        _lookup(obj, "hyper_parameters", "config", "model", "num_heads"),
        _lookup(obj, "ctor_kwargs", "attention_heads"),
    )
    return next((int(h) for h in candidates if isinstance(h, int) and h > 0), None)


def infer_arch(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> ViTArch:
    """Rebuild the architecture from weight shapes. The head count is not in the weights: it is
    ``num_heads`` when given, else the standard one of the width (:data:`HEADS_BY_WIDTH`); any
    other width raises :class:`CheckpointError` asking for ``model.num_heads``."""
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
    heads = num_heads or HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        raise CheckpointError(
            f"the weights do not record the attention-head count and width {embed_dim} is not a "
            "standard ViT width (known: "
            f"{', '.join(f'{w}: {h}' for w, h in HEADS_BY_WIDTH.items())}); "
            "give it as model.num_heads=N"
        )
    if embed_dim % heads:
        raise CheckpointError(f"model.num_heads={heads} does not divide the width {embed_dim}")
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


def _state_and_arch(
    obj: Mapping[str, Any], name: str, num_heads: int | None, keep_head: bool = False
) -> tuple[dict[str, torch.Tensor], ViTArch]:
    """The tensors of ``obj`` and its architecture (saved, or inferred with the recorded or given
    head count, which must agree)."""
    recorded = saved_num_heads(obj)
    if recorded is not None and num_heads is not None and recorded != num_heads:
        raise CheckpointError(
            f"{name} records {recorded} attention heads, but model.num_heads={num_heads} was given"
        )
    state, saved_arch = _state_dict(obj, keep_head)
    if saved_arch is not None:
        return state, ViTArch(**saved_arch)
    try:
        return state, infer_arch(state, recorded or num_heads)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None


def load_encoder(source: str | Path | Mapping[str, Any], num_heads: int | None = None) -> MaskedViT:
    """Load a ViT encoder (a ``timm.models.VisionTransformer``) from a run directory, a
    checkpoint file or a state dict; the architecture is inferred from the weights.

    Args:
        source: A run directory, a checkpoint file in one of the formats of this module, or a
            state dict.
        num_heads: Attention heads per block (the ``model.num_heads`` key of the commands). It
            must agree with the count the checkpoint records, if any; it is required for a
            checkpoint that records none and whose width is not in :data:`HEADS_BY_WIDTH`.

    ``forward_features(x)`` of the result returns the normed tokens ``[B, 1 + N, D]``.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    obj, name = _read(source)
    state, arch = _state_and_arch(obj, name, num_heads)
    if "pos_embed" in state and state["pos_embed"].shape[1] == arch.num_patches:
        cls_slot = state["pos_embed"].new_zeros(1, 1, arch.embed_dim)  # MAE-CT: no CLS slot
        state["pos_embed"] = torch.cat([cls_slot, state["pos_embed"]], dim=1)
    encoder = MaskedViT(arch)
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: weights do not fit {arch}: {_first_line(err)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{name}: weights do not fit the inferred {arch}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return encoder.eval()


def save_encoder(encoder: MaskedViT, path: Path) -> None:
    """Write ``{"model": timm state dict, "arch": ...}`` (timm's ``load_checkpoint`` reads it)."""
    atomic_save({"model": encoder.state_dict(), "arch": dataclasses.asdict(encoder.arch)}, path)


def load_classifier(
    source: str | Path | Mapping[str, Any], num_heads: int | None = None, drop_path: float = 0.0
) -> ViTClassifier:
    """Load a fine-tuned ViT classifier (a ``timm.models.VisionTransformer`` with a head) from a
    maect fine-tuning run directory (``classifier.pt``, else ``checkpoints/last.ckpt``), a
    ``classifier.pt``, a facebookresearch/mae fine-tuned checkpoint (``{"model": ...}`` with
    ``head.*`` and, for global average pooling, ``fc_norm.*`` instead of ``norm.*``) or a timm
    classifier state dict. The pooling follows the weights: ``fc_norm`` means ``avg``. The head
    count is found as for :func:`load_encoder`.

    Raises:
        CheckpointError: If the checkpoint holds no classifier head, or weights do not fit.
    """
    obj, name = _read(source, CLASSIFIER_FILES)
    state, arch = _state_and_arch(obj, name, num_heads, keep_head=True)
    if "head.weight" not in state:
        raise CheckpointError(f"{name} holds no classifier (no head.weight)")
    global_pool = "avg" if "fc_norm.weight" in state else "token"
    model = ViTClassifier(arch, state["head.weight"].shape[0], global_pool, drop_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"{name}: weights do not fit {arch} ({global_pool} pooling): {_first_line(err)}"
        ) from None
    return model.eval()


def holds_classifier(source: str | Path | Mapping[str, Any]) -> bool:
    """Whether ``source`` (as :func:`load_classifier` reads it; a run directory without its
    files is read as :func:`load_encoder` reads it, e.g. a ``maect tune`` run, whose checkpoints
    live in ``head/`` and ``tune/``) has a classifier head."""
    obj, _ = _read(source, (*CLASSIFIER_FILES, *ENCODER_FILES), mmap=True)
    return "head.weight" in _state_dict(obj, keep_head=True)[0]


def save_classifier(model: ViTClassifier, path: Path) -> None:
    """Write ``classifier.pt``: ``{"model": timm state dict, "arch", "num_classes",
    "global_pool", "timm_name"}``; ``timm.create_model(timm_name, num_classes=...,
    global_pool=...)`` (standard shapes) or :func:`load_classifier` rebuilds it."""
    atomic_save(classifier_record(model), path)
