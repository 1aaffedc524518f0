"""node layer."""
