"""Built-in TP plan plugin for `llama` (being implemented)."""
