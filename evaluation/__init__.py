"""Benchmark evaluation: readers of the published formats, strict and paper protocols, metrics."""
