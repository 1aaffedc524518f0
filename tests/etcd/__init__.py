"""Tests against a real 3-member etcd cluster (Debian's etcd-server) on 127.0.0.1."""
