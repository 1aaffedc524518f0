"""RustBalance: load balancing and high availability for Tor v3 onion services."""

__version__ = "0.1.0"
