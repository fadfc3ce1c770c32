"""Built-in strategy plugin `megatron_fsdp` (being implemented)."""
