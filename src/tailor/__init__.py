"""tailor: customize a pretrained language model for a domain, end to end."""

__version__ = "0.1.0"
