"""Evaluation: sampling policies, judging their samples, and the metrics that compare methods."""
