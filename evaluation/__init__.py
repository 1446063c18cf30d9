"""Compares the ways to get an adapter for a task (trained, retrieved + composed, generated) on the
same held-out test items: ``registry bench`` and the README's ``registry demo``."""
