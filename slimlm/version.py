"""The package version, importable without importing the rest of slimlm."""

__version__ = "0.1.0"
