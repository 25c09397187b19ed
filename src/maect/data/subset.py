"""Fixed, class-balanced random subsets."""

import torch


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` samples, spread as evenly as possible over the classes.

    The same labels, size and seed always give the same (sorted) indices. Unlabeled samples
    (label -1) are drawn uniformly.
    """
    if size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    if (classes < 0).any():
        return torch.sort(torch.randperm(len(labels), generator=gen)[:size]).values
    per_class, extra = divmod(size, len(classes))
    chosen = []
    for rank, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        take = min(len(members), per_class + (1 if rank < extra else 0))
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.sort(torch.cat(chosen)).values
