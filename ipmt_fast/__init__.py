"""ipmt-fast: fast, faithful IPMT."""
