"""Built-in TP plan plugin for `qwen` (being implemented)."""
