"""tor layer."""
