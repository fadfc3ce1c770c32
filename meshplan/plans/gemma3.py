"""Built-in TP plan plugin for `gemma3` (being implemented)."""
