"""Test suite of cmfl-flower."""
