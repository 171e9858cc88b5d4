"""moeify: turn a dense Hugging Face causal language model into a Mixture-of-Experts model."""

__version__ = "0.1.0"

from moeify.errors import MoeifyError

__all__ = ["MoeifyError", "__version__"]
