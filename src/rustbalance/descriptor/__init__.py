"""descriptor layer."""
