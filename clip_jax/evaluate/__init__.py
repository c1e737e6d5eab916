"""Evaluation: zero-shot classification, retrieval, dense and detection metrics."""
