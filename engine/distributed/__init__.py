"""Process groups and the collectives the model layers use (torch.distributed: NCCL on GPUs, gloo on CPUs)."""
