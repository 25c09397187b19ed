"""MAE-CT (Lehner et al. 2023): NNCLR contrastive tuning of a pretrained MAE encoder.

Stage 2 (:class:`NNCLRHeadTraining`) trains the NNCLR head on the frozen encoder; stage 3
(:class:`ContrastiveTuning`) tunes the top blocks with layer-wise lr decay, an EMA target
projector for the neighbour lookup and an EMA of the encoder for evaluation. No reconstruction
loss in either stage. Both stages share the NNCLR step of :class:`NNCLRMethod`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from maect.checkpoints import CheckpointError
from maect.config import ConfigError, MAECTConfig, RefinerConfig, RunConfig
from maect.data.transforms import VIEW_PAIRS
from maect.distributed import gather_no_grad
from maect.losses.contrastive import nnclr_loss
from maect.methods.base import EncoderTuning, PretrainMethod
from maect.methods.schedule import decay_groups, layer_decay_groups
from maect.models.ema import ema_update, frozen_copy
from maect.models.heads import NNCLRPredictor, NNCLRProjector
from maect.models.nn_queue import NNQueue
from maect.models.pooling import pool_tokens
from maect.models.vit import MaskedViT
from maect.sharding import whole_root_params, whole_state_dict

HEAD_KEYS = ("projector", "predictor", "queue")
# The bias of the predictor's last Linear, which heads written before maect matched the official
# (bias-free) predictor carry.
LEGACY_PREDICTOR_BIAS = "3.bias"


def frozen_block_count(cfg: RunConfig) -> int:
    """Blocks kept frozen in stage 3 (default: the bottom half, as in the paper)."""
    frozen = cfg.maect.frozen_blocks
    return cfg.model.depth // 2 if frozen is None else frozen


def head_schedule(cfg: RunConfig, section: MAECTConfig | RefinerConfig) -> RunConfig:
    """``cfg`` with the head stage's lr, weight decay, warmup and epochs (``head_*`` of the
    method's ``section``) in place of ``optim``'s and ``trainer.epochs``."""
    optim = dataclasses.replace(
        cfg.optim,
        base_lr=section.head_base_lr,
        weight_decay=section.head_weight_decay,
        warmup_epochs=section.head_warmup_epochs,
    )
    trainer = dataclasses.replace(cfg.trainer, epochs=max(1, section.head_epochs))
    return dataclasses.replace(cfg, optim=optim, trainer=trainer)


def head_stage_config(cfg: RunConfig) -> RunConfig:
    """Stage-2 settings: the head's lr, weight decay, warmup and epochs replace ``optim``'s, and
    ``maect.head_temperature`` replaces stage 3's ``maect.temperature``."""
    t = cfg.maect
    maect = dataclasses.replace(t, temperature=t.head_temperature)
    return dataclasses.replace(head_schedule(cfg, t), maect=maect)


def refuse_legacy_predictor(predictor_state: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` if ``predictor_state`` holds the last-layer bias of the
    predictor that maect used before it matched the official head."""
    if LEGACY_PREDICTOR_BIAS in predictor_state:
        raise CheckpointError(
            f"{source} holds an NNCLR predictor whose last layer has a bias (written by an older "
            "maect; the official MAE-CT head has none, nor does this one): train the head again "
            "in a new out= directory"
        )


def check_queue_size(size: int, batch_size: int, world_size: int, key: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless the queue holds whole global batches."""
    global_batch = batch_size * world_size
    if size % global_batch:
        raise ConfigError(
            f"{key}={size} is not a multiple of the global batch "
            f"{global_batch} (data.batch_size={batch_size} x {world_size} devices)"
        )


class NNCLRMethod(PretrainMethod):
    """Shared NNCLR step: both views through the encoder as one batch, pooled, each view through
    the head separately (BatchNorm statistics per view), neighbours from the queue, symmetric
    loss, FIFO queue update with the globally gathered view-0 targets."""

    lr_views = 2  # MAE-CT scales lr with the number of views: base_lr x (2 x batch) / 256
    topk = 1

    def __init__(self, cfg: RunConfig, encoder: MaskedViT) -> None:
        super().__init__(cfg, encoder)
        t = cfg.maect
        width = encoder.embed_dim * (2 if t.pooling == "cls+mean" else 1)
        self.projector = NNCLRProjector(width, t.proj_hidden_dim, t.proj_dim)
        self.predictor = NNCLRPredictor(t.proj_dim, t.pred_hidden_dim, t.proj_dim)
        self.queue = NNQueue(t.queue_size, t.proj_dim, seed=cfg.trainer.seed)
        self._entries_written = 0

    # ------------------------------------------------------------------ hooks

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens ``[B, 1 + N, D]`` of unmasked images."""
        raise NotImplementedError

    def target_embedding(self, pooled: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """Embedding used for the neighbour lookup and the queue (no gradient)."""
        raise NotImplementedError

    def view_specs(self) -> list[dict]:
        return list(VIEW_PAIRS[self.cfg.maect.views])

    # ------------------------------------------------------------------ step

    def check_world(self, world_size: int) -> None:
        batch = self.cfg.data.batch_size
        check_queue_size(self.queue.size, batch, world_size, "maect.queue_size")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefix = "predictor."
        state = checkpoint["state_dict"]
        predictor = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        refuse_legacy_predictor(predictor, "the checkpoint to resume from")
        super().on_load_checkpoint(checkpoint)

    def on_train_start(self) -> None:
        super().on_train_start()
        # after a resume the restored queue may already hold real samples only
        self._entries_written = int((self.queue.ids >= 0).sum())

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        view0, view1 = batch["image"]
        batch_size = len(view0)
        tokens = self.encode(torch.cat([view0, view1]))
        pooled = pool_tokens(tokens, self.cfg.maect.pooling)
        projections = [self.projector(pooled[:batch_size]), self.projector(pooled[batch_size:])]
        predictions = [self.predictor(p) for p in projections]
        targets = [
            self.target_embedding(pooled[i * batch_size : (i + 1) * batch_size], projections[i])
            for i in range(2)
        ]
        ids, labels = batch["index"], batch["label"]
        nn0, index0 = self.queue.find_nn(targets[0], ids, self.topk)
        nn1, _ = self.queue.find_nn(targets[1], ids, self.topk)
        loss = nnclr_loss(predictions[0], predictions[1], nn0, nn1, self.cfg.maect.temperature)
        losses = {"loss": loss}
        if self._entries_written >= self.queue.size:  # queue holds only real samples now
            losses["nn_acc"] = self.queue.nn_label_accuracy(index0, labels)
        global_ids = gather_no_grad(ids)
        self.queue.update(gather_no_grad(targets[0]), global_ids, gather_no_grad(labels))
        self._entries_written += len(global_ids)
        return losses


class NNCLRHeadTraining(NNCLRMethod):
    """Stage 2: only the NNCLR head trains; the encoder is frozen and in eval mode."""

    def __init__(self, cfg: RunConfig, encoder: MaskedViT) -> None:
        super().__init__(head_stage_config(cfg), encoder)
        self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> NNCLRHeadTraining:
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.forward_features(images)

    def target_embedding(self, pooled: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection.detach().float(), dim=-1)

    def head_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Projector, predictor and queue with whole weights, handed to stage 3 (under FSDP
        gathered from the shards: every rank calls this)."""
        return {key: whole_state_dict(self, key) for key in HEAD_KEYS}


class ContrastiveTuning(EncoderTuning, NNCLRMethod):
    """Stage 3: the top blocks, the final norm and the head train; the bottom ``frozen_blocks``
    blocks and, if there are any, the patch embedding and CLS token stay frozen (no activations
    stored) and in eval mode."""

    def __init__(self, cfg: RunConfig, encoder: MaskedViT, head_state: dict | None = None) -> None:
        super().__init__(cfg, encoder)
        self.topk = cfg.maect.topk
        self.frozen_blocks = frozen_block_count(cfg)
        if head_state is not None:
            refuse_legacy_predictor(head_state["predictor"], "head/head.pt")
            for key in HEAD_KEYS:
                getattr(self, key).load_state_dict(head_state[key])
        self.target_projector = frozen_copy(self.projector)
        self.ema_encoder = frozen_copy(encoder) if cfg.maect.encoder_ema > 0 else None
        self.encoder.cls_token.requires_grad_(self.frozen_blocks == 0)
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The bottom ``frozen_blocks`` blocks and, with them, the patch embedding (the CLS token
        too): the stem is frozen with block 0, as the official ``VitBlockFreezer`` does, so with
        ``frozen_blocks=0`` the whole encoder trains. The positions are a fixed table."""
        stem = [self.encoder.patch_embed] if self.frozen_blocks > 0 else []
        return [*stem, *self.encoder.blocks[: self.frozen_blocks]]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_partially_frozen(images, self.frozen_blocks)

    def target_embedding(self, pooled: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # BatchNorm in batch-statistics mode, as the online projector
            return F.normalize(self.target_projector(pooled.detach()).float(), dim=-1)

    def param_groups(self) -> list[dict]:
        t, o = self.cfg.maect, self.cfg.optim
        groups = layer_decay_groups(
            self.encoder, self.cfg.model.depth, t.layer_decay, o.weight_decay
        )
        head = [*self.projector.named_parameters(), *self.predictor.named_parameters()]
        groups += decay_groups(
            head, t.tune_head_weight_decay, lr_scale=t.tune_head_base_lr / o.base_lr
        )
        return groups

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with whole_root_params(self):  # FSDP: EMA and online parameters shaped alike
            ema_update(self.target_projector, self.projector, self.cfg.maect.target_ema)
            if self.ema_encoder is not None:
                ema_update(self.ema_encoder, self.encoder, self.cfg.maect.encoder_ema)
