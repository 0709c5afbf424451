"""hybridctl: a command-line lab for hybrid Gated DeltaNet + attention language models."""

__version__ = "0.1.0"
