"""Task data: datasets and counter-based task samplers."""
