"""slimlm: make large language models smaller and faster, and measure what it cost."""

__version__ = "0.1.0"
