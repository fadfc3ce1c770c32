"""The package version, importable without importing anything else of meshplan."""

__version__ = "0.1.0"
