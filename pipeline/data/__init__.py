"""The data stages: `python -m pipeline.data.fetch` (MNIST, checked) and `python -m pipeline.data.generate`
(Moving MNIST from it, byte for byte the same on any machine)."""
