"""plano-extproc: an LLM-routing gateway built as an Envoy external-processing service."""

__version__ = "0.1.0"
