"""The runtime: build services from source, run them as supervised processes, keep their logs."""
