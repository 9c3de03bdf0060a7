"""Parallel training on real torch.distributed: launch (spawn / torchrun), instrumented collectives,
data parallelism (naive, bucketed, torch DDP, FSDP2) and ZeRO stages 1-3."""
