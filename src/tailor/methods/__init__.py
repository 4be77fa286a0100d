"""Customization methods, one module each, found only through `registry`."""
