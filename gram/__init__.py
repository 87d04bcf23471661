"""GRAM: Gramian multimodal representation learning and alignment."""

__version__ = "0.1.0"
