"""Evaluation: metrics with missing labels, scoring a bundle, zero-shot classification and
image-report retrieval."""
