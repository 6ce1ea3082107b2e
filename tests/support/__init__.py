"""Helpers for the tests only."""
