"""The micro command line."""
