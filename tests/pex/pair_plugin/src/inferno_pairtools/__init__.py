"""A plugin of the pair fixture that offers no role: every per-role pex keeps it."""
