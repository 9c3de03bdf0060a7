"""Worker functions for the launcher tests (spawned ranks import them by name)."""
import time

import torch
import torch.distributed as dist


def fail_on(rank_to_fail: int, message: str = "boom") -> None:
    """One rank raises while the others wait in a collective that will never complete."""
    if dist.get_rank() == rank_to_fail:
        raise RuntimeError(f"{message} on rank {rank_to_fail}")
    dist.barrier()
    dist.all_reduce(torch.ones(1))


def sleep_forever() -> None:
    """A run that never ends on its own (the launcher's timeout must stop it)."""
    while True:
        time.sleep(1)
