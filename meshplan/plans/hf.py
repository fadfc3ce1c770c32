"""Built-in TP plan plugin for `hf` (being implemented)."""
