"""A helper package only the ``left`` role needs (named in its ``Role.packages``)."""

GREETING = "left says hello"
