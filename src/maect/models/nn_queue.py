"""FIFO queue of embeddings for NNCLR's nearest-neighbour lookup (MAE-CT stages 2 and 3)."""

import torch
import torch.nn.functional as F
from torch import nn


class NNQueue(nn.Module):
    """Queue of L2-normalised embeddings with the sample ids (and labels) that produced them.

    All state lives in buffers, so it is saved in checkpoints and moved with ``.to()``. Nothing here
    is differentiable. Under DDP, feed :meth:`update` the globally gathered batch so that every rank
    holds the same queue.

    Args:
        size: Number of entries; must be a multiple of the global batch passed to :meth:`update`.
        dim: Embedding width.
        seed: Seed of the Gaussian initialisation (identical on every rank).
    """

    embeddings: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("embeddings", init)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        """Number of entries."""
        return self.embeddings.shape[0]

    @torch.no_grad()
    def find_nn(
        self,
        z: torch.Tensor,
        ids: torch.Tensor | None = None,
        topk: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest queue entries by cosine similarity.

        Args:
            z: L2-normalised queries, ``[B, dim]``.
            ids: Non-negative sample ids of the queries, ``[B]``; queue entries holding the same id
                are excluded (a sample is never its own neighbour).
            topk: 1 for the exact nearest neighbour, else a uniform pick among the ``topk`` nearest.
                Needs at least ``topk`` entries per query left after the exclusion.
            generator: Random generator for the top-k pick (its device is used for the draw).

        Returns:
            The neighbours' embeddings ``[B, dim]`` and their queue indices ``[B]``.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            similarity = z.to(self.embeddings.dtype) @ self.embeddings.T
        if ids is not None:
            similarity.masked_fill_(ids[:, None] == self.ids[None, :], float("-inf"))
        if topk == 1:
            index = similarity.argmax(dim=1)
        else:
            candidates = similarity.topk(topk, dim=1).indices
            draw_device = generator.device if generator is not None else z.device
            shape = (z.shape[0], 1)
            pick = torch.randint(topk, shape, generator=generator, device=draw_device)
            index = candidates.gather(1, pick.to(z.device)).squeeze(1)
        return self.embeddings[index], index

    @torch.no_grad()
    def update(
        self, z: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        """Write a batch at the pointer (FIFO, overwriting the oldest entries) and advance it.

        Args:
            z: Globally gathered, L2-normalised embeddings, ``[N, dim]``.
            ids: Their sample ids, ``[N]``.
            labels: Their class labels, ``[N]``, only used by :meth:`nn_label_accuracy`; stored as
                -1 (unknown) when omitted.

        Raises:
            ValueError: If the queue size is not a multiple of ``N``.
        """
        batch = z.shape[0]
        if self.size % batch != 0:
            raise ValueError(
                f"queue size {self.size} is not a multiple of the global batch {batch}; "
                "choose a queue size divisible by (per-device batch × number of devices) and "
                "drop the last incomplete batch"
            )
        window = (self.ptr + torch.arange(batch, device=self.ptr.device)) % self.size  # no sync
        # rows that are not finite (a skipped non-finite step) keep the old entry; no host sync
        finite = torch.isfinite(z).all(dim=1)
        new_labels = torch.full_like(ids, -1) if labels is None else labels
        self.embeddings[window] = torch.where(
            finite[:, None], z.to(self.embeddings.dtype), self.embeddings[window]
        )
        self.ids[window] = torch.where(finite, ids, self.ids[window])
        self.labels[window] = torch.where(finite, new_labels, self.labels[window])
        self.ptr.copy_((self.ptr + batch) % self.size)

    @torch.no_grad()
    def nn_label_accuracy(self, nn_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fraction of neighbours whose stored label equals the query's label.

        Pairs where either label is -1 (unknown) are ignored; NaN when no pair is left.

        Args:
            nn_index: Queue indices from :meth:`find_nn`, ``[B]``.
            labels: Labels of the queries, ``[B]``.

        Returns:
            Scalar float tensor.
        """
        stored = self.labels[nn_index]
        valid = (stored >= 0) & (labels >= 0)
        return ((stored == labels) & valid).sum().float() / valid.sum().float()
