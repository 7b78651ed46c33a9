"""prune-cli: context-aware dynamic pruning of speech foundation models."""

__version__ = "0.1.0"
