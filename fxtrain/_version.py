"""The package version: one place, read by pyproject.toml and by checkpoint metadata."""

__version__ = "0.1.0"
