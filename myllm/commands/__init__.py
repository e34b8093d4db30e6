"""Sub-commands of the ``myllm`` CLI, one module each (see :mod:`myllm.cli`)."""
