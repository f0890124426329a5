"""The ``right`` role of the pair fixture."""
