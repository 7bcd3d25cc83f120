"""Inference driven by a bundle: volume in, labels on the input's grid out."""
