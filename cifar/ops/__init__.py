"""Operations: the team stack on one machine (PostgreSQL + mlflow server) and the Heroku deploy tree.

Imports nothing: each module is imported by name.
"""
