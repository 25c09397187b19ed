"""Pooling of encoder tokens ``[B, 1 + N, D]`` (CLS first) into one vector per image."""

import torch

POOLINGS = ("cls", "mean", "cls+mean")


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """``cls``: the CLS token; ``mean``: mean of the patch tokens; ``cls+mean``: both."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, 1:].mean(dim=1)
    if pooling == "cls+mean":
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)
    raise ValueError(f"unknown pooling '{pooling}', expected one of {', '.join(POOLINGS)}")
