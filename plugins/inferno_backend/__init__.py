"""The ``backend`` role: an OpenAI-compatible inference node over a pluggable engine.

A first-party plugin: it reaches the core only through hooks and the core's
public API, exactly as a third-party plugin would.
"""
