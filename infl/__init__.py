"""infl: influence functions with EK-FAC for Hugging Face causal language models."""

__version__ = "0.1.0"
