"""Answering questions about images: batched greedy generation and its input encoder."""
