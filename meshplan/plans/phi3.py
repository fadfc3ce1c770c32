"""Built-in TP plan plugin for `phi3` (being implemented)."""
