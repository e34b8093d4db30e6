"""Training data: the window-source contract the training loop reads, and its implementations."""

from myllm.data.source import Window, WindowSource

__all__ = ["Window", "WindowSource"]
