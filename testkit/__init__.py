"""Test support shared by tests/ and bench/: tiny models, random stores, a local S3 server."""
