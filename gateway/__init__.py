"""imagegate: an inference gateway for image generation. This package never imports torch."""

__version__ = "0.1.0"
