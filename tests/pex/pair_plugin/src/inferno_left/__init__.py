"""The ``left`` role of the pair fixture."""
