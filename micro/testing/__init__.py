"""Test helpers shipped with the framework: conformance suites and fixtures."""
