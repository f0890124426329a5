"""``python -m inferno``: the same command as the ``inferno`` script."""

from __future__ import annotations

from inferno.cli import run

if __name__ == "__main__":
    run()
