"""testnet layer."""
