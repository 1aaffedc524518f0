"""Deployment helpers: the versioned join token (:mod:`rustbalance.deploy.join_token`)."""
