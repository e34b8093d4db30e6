"""Pure weight transforms (state dict in -> state dict out) and the module-level conversions built on them."""
