"""Helpers shared by the test modules (conftest.py holds only fixtures; test modules never import each other)."""
