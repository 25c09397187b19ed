"""MIM-Refiner (Alkin et al. 2024): contrastive refinement of several blocks of a pretrained MIM
encoder.

Each block of ``refiner.blocks`` gets its own NNCLR head (projector, predictor with a final
BatchNorm, GELU) and its own nearest-neighbour queue; the CLS token of the block's output (the
final-norm output for the last block, the raw residual stream otherwise) goes through it. Views:
two global crops plus ``refiner.local_views`` smaller local crops, which only contribute
predictions (they are never looked up in or written to a queue). The loss is the sum over heads of
:func:`~maect.losses.contrastive.multicrop_nn_loss` (NNA or NNCLR).

Stage 2 (:class:`RefinerHeadTraining`) trains the heads on the frozen encoder; stage 3
(:class:`RefinerTuning`) trains the whole encoder (minus the bottom ``frozen_blocks``) with
layer-wise lr decay and keeps an encoder EMA for evaluation. Both share :class:`RefinerMethod`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maect.config import RefinerConfig, RunConfig
from maect.data.datasets import normalization_stats
from maect.data.transforms import LOCAL_VIEWS, VIEW_PAIRS, multi_crop
from maect.distributed import gather_no_grad
from maect.losses.contrastive import multicrop_nn_loss, multicrop_pairs
from maect.methods.base import EncoderTuning, PretrainMethod
from maect.methods.maect import check_queue_size, head_schedule
from maect.methods.schedule import decay_groups, layer_decay_groups
from maect.models.ema import ema_update, frozen_copy
from maect.models.heads import NNCLRPredictor, NNCLRProjector
from maect.models.nn_queue import NNQueue
from maect.models.pooling import pool_tokens
from maect.models.vit import MaskedViT, init_mae_weights
from maect.sharding import whole_root_params, whole_state_dict

GLOBAL_VIEWS = 2


def head_blocks(cfg: RunConfig) -> list[int]:
    """``refiner.blocks`` as 0-based indices (negative ones counted from the end)."""
    return [block % cfg.model.depth for block in cfg.refiner.blocks]


class RefinerHead(nn.Module):
    """Projector, predictor and queue of one block, initialised like the official heads
    (xavier-uniform linears, BatchNorm weight 1 and bias 0)."""

    def __init__(self, in_dim: int, r: RefinerConfig, seed: int) -> None:
        super().__init__()
        act = r.head_activation
        self.projector = NNCLRProjector(in_dim, r.proj_hidden_dim, r.proj_dim, activation=act)
        self.predictor = NNCLRPredictor(
            r.proj_dim, r.pred_hidden_dim, r.proj_dim, activation=act, out_norm=True
        )
        self.queue = NNQueue(r.queue_size, r.proj_dim, seed=seed)
        self.projector.apply(init_mae_weights)
        self.predictor.apply(init_mae_weights)


class RefinerMethod(PretrainMethod):
    """Shared step of both stages: global views through the encoder as one batch, local views
    as another, the tokens of every head's block pooled; per head all views through projector
    and predictor as one batch (BatchNorm statistics over all views, as the official code), the
    global views' normalised projections looked up in the head's queue, the multi-crop loss,
    and a FIFO update of every queue with the globally gathered view-0 projections."""

    topk = 1  # stage 2: the exact nearest neighbour

    def __init__(self, cfg: RunConfig, encoder: MaskedViT) -> None:
        super().__init__(cfg, encoder)
        r = cfg.refiner
        self.blocks = head_blocks(cfg)
        width = encoder.embed_dim
        self.heads = nn.ModuleDict(
            {f"block{b}": RefinerHead(width, r, cfg.trainer.seed + b) for b in self.blocks}
        )
        self.pairs = multicrop_pairs(GLOBAL_VIEWS, r.local_views, r.local_terms == "official")
        self._entries_written = 0

    # ------------------------------------------------------------------ hooks

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + N, D]`` of every head's block (in ``self.blocks`` order)."""
        raise NotImplementedError

    def view_specs(self) -> list[dict]:
        """Pixel keywords of the two global views, then of every local view."""
        r = self.cfg.refiner
        return [*VIEW_PAIRS[r.views], *[LOCAL_VIEWS[r.views]] * r.local_views]

    def train_transform(self) -> Callable:
        """Every view made in the loader (:func:`multi_crop`; ``data.augment_on=device`` is
        refused for the refiner in the config)."""
        m, d, r = self.cfg.model, self.cfg.data, self.cfg.refiner
        mean, std = normalization_stats(d.name, m.in_chans)
        return multi_crop(
            r.views,
            m.img_size,
            r.local_size,
            r.local_views,
            m.in_chans,
            mean,
            std,
            d.crop_scale,
            r.local_crop_scale,
            d.hflip,
        )

    def head_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Projectors, predictors and queues of every head, handed to stage 3 (whole weights:
        under FSDP gathered from the shards, so every rank calls this)."""
        return {"heads": whole_state_dict(self, "heads")}

    # ------------------------------------------------------------------ step

    def check_world(self, world_size: int) -> None:
        size = self.cfg.refiner.queue_size
        check_queue_size(size, self.cfg.data.batch_size, world_size, "refiner.queue_size")

    def on_train_start(self) -> None:
        super().on_train_start()
        # after a resume the restored queues may already hold real samples only
        first = next(iter(self.heads.values()))
        self._entries_written = int((first.queue.ids >= 0).sum())

    def pooled_features(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pooled features ``[V * B, D]`` per head, views in order (global, then local)."""
        pooling = self.cfg.refiner.pooling
        pooled = [pool_tokens(t, pooling) for t in self.encode(torch.cat(views[:GLOBAL_VIEWS]))]
        if len(views) > GLOBAL_VIEWS:
            local = self.encode(torch.cat(views[GLOBAL_VIEWS:]))
            pooled = [
                torch.cat([g, pool_tokens(t, pooling)]) for g, t in zip(pooled, local, strict=True)
            ]
        return pooled

    def head_loss(
        self, head: RefinerHead, pooled: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One head's loss, its view-0 targets (for the queue) and the queue indices of the
        global views' neighbours."""
        batch = len(ids)
        views = len(pooled) // batch
        projections = head.projector(pooled)
        predictions = head.predictor(projections)
        targets = F.normalize(projections[: GLOBAL_VIEWS * batch].detach().float(), dim=-1)
        neighbours, index = head.queue.find_nn(targets, ids.repeat(GLOBAL_VIEWS), self.topk)

        def per_sample(x: torch.Tensor, count: int) -> torch.Tensor:
            return x.view(count, batch, -1).transpose(0, 1)  # [views * B, D] -> [B, views, D]

        r = self.cfg.refiner
        loss = multicrop_nn_loss(
            per_sample(predictions, views),
            per_sample(neighbours, GLOBAL_VIEWS),
            self.pairs,
            r.temperature,
            anchors=per_sample(targets, GLOBAL_VIEWS) if r.loss == "nna" else None,
        )
        return loss, targets[:batch], index

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        ids, labels = batch["index"], batch["label"]
        pooled = self.pooled_features(list(batch["image"]))
        losses: dict[str, torch.Tensor] = {}
        targets, accuracies = [], []
        queue_full = self._entries_written >= self.cfg.refiner.queue_size
        for (name, head), features in zip(self.heads.items(), pooled, strict=True):
            loss, target, index = self.head_loss(head, features, ids)
            losses[f"loss_{name}"] = loss
            targets.append(target)
            if queue_full:  # only real samples in the queue now
                accuracy = head.queue.nn_label_accuracy(index, labels.repeat(GLOBAL_VIEWS))
                losses[f"nn_acc_{name}"] = accuracy
                accuracies.append(accuracy)
        losses["loss"] = torch.stack([losses[f"loss_{name}"] for name in self.heads]).sum()
        if accuracies:
            losses["nn_acc"] = torch.stack(accuracies).mean()
        # one collective for all heads' queue entries
        global_targets = gather_no_grad(torch.stack(targets, dim=1))
        global_ids, global_labels = gather_no_grad(ids), gather_no_grad(labels)
        for h, head in enumerate(self.heads.values()):
            head.queue.update(global_targets[:, h], global_ids, global_labels)
        self._entries_written += len(global_ids)
        return losses


class RefinerHeadTraining(RefinerMethod):
    """Stage 2: only the heads train; the encoder is frozen and in eval mode."""

    def __init__(self, cfg: RunConfig, encoder: MaskedViT) -> None:
        super().__init__(head_schedule(cfg, cfg.refiner), encoder)
        self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> RefinerHeadTraining:
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.encoder.forward_blocks(images, self.blocks)


class RefinerTuning(EncoderTuning, RefinerMethod):
    """Stage 3: the encoder and the heads train; with ``refiner.frozen_blocks > 0`` the patch
    embedding, the CLS token and the bottom blocks stay frozen (no activations stored) and in
    eval mode. An encoder EMA (``refiner.encoder_ema``) is exported for evaluation."""

    def __init__(self, cfg: RunConfig, encoder: MaskedViT, head_state: dict | None = None) -> None:
        super().__init__(cfg, encoder)
        r = cfg.refiner
        self.topk = r.topk
        self.frozen_blocks = r.frozen_blocks
        if head_state is not None:
            self.heads.load_state_dict(head_state["heads"])
        self.ema_encoder = frozen_copy(encoder) if r.encoder_ema > 0 else None
        if self.frozen_blocks:
            self.encoder.cls_token.requires_grad_(False)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        for module in self.unused_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        """Patch embedding and the bottom blocks when any block is frozen, else nothing."""
        if not self.frozen_blocks:
            return []
        return [self.encoder.patch_embed, *self.encoder.blocks[: self.frozen_blocks]]

    def unused_modules(self) -> list[nn.Module]:
        """What no head's output depends on: the blocks above the deepest head, and the final
        norm unless the last block has a head (not trained; DDP needs every trained parameter
        to receive a gradient)."""
        unused: list[nn.Module] = list(self.encoder.blocks[max(self.blocks) + 1 :])
        if self.cfg.model.depth - 1 not in self.blocks:
            unused.append(self.encoder.norm)
        return unused

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_blocks(images, self.blocks, self.frozen_blocks)

    def param_groups(self) -> list[dict]:
        r, o = self.cfg.refiner, self.cfg.optim
        # the official ViT exempts its CLS token from weight decay (ExcludeFromWdByNameModifier)
        groups = layer_decay_groups(
            self.encoder, self.cfg.model.depth, r.layer_decay, o.weight_decay, exempt={"cls_token"}
        )
        groups += decay_groups(
            self.heads.named_parameters(),
            r.tune_head_weight_decay,
            lr_scale=r.tune_head_base_lr / o.base_lr,
        )
        return groups

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema_encoder is not None:
            with whole_root_params(self):  # FSDP: EMA and online parameters shaped alike
                ema_update(self.ema_encoder, self.encoder, self.cfg.refiner.encoder_ema)
