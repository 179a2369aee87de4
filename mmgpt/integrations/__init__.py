"""Adapters that let other tools drive an mmgpt model (benchmark harnesses)."""
