"""Reliability suite (issue 7): the fault matrix of docs/reliability.md, a bounded soak test and
the log-secret scanner's own test."""
