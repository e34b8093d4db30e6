"""myllm: model surgery for decoder-only LLMs.

Importing myllm registers its blocks and (once the model package exists) the ``myllm`` model type with
transformers' Auto classes; it changes nothing else in transformers.
"""

__version__ = "0.1.0"

from myllm import blocks, factory, surgery  # noqa: E402

__all__ = ["blocks", "factory", "surgery", "__version__"]
