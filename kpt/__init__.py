"""kpt: kernel-first PyTorch ops for LLM inference and training."""

__version__ = "0.1.0"
