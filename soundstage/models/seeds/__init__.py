"""The seed methods' models, as their code computes them, built around transformers' Mask2Former."""
