"""Evaluation: the configurations compared, their generation and scores, and the plots."""
