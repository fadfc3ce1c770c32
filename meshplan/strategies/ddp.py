"""Built-in strategy plugin `ddp` (being implemented)."""
