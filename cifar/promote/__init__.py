"""From runs to the registry: candidates chosen on validation, registration and promotion,
the bundled model a fresh clone serves, and the outbox's sync.

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
