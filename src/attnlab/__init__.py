"""attnlab: measure information flow through attention and compare sparse-attention policies."""

__version__ = "0.1.0"
