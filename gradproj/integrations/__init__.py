"""Integrations with model libraries, each importing its library lazily."""
