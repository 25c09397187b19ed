"""Joining a 2-process gloo group in spawned test workers."""

import datetime

import torch.distributed as dist


def init_gloo(rank: int, init_file: str, world_size: int) -> None:
    """Join the CPU process group through a shared file (no free port needed)."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
