"""Operations: the team stack on one machine (PostgreSQL + mlflow server) and file locks.

Imports nothing: each module is imported by name, so the slim app venv can read the serving path.
"""
