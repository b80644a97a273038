"""The ``vqatune`` command line (``vqatune info``, ``vqatune ask``)."""
