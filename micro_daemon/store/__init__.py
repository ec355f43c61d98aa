"""The store building block."""
