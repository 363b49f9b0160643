"""probe: what facts does a frozen language model know? Manual, discrete and continuous prompts on LAMA."""

__version__ = "0.1.0"
