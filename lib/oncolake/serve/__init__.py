"""Serving: the REST API and web page (:mod:`app`), sign-in and roles (:mod:`auth`), loaded models (:mod:`models`).

``scripts/serve.sh`` runs :mod:`oncolake.serve.__main__` (uvicorn on
127.0.0.1:8000); ``scripts/users.sh`` manages the users (:mod:`users`).
Predictions come from PostgreSQL (the export job fills it) and uploads are
predicted with the registry's models through the pipeline's own
preprocessing. No Spark in this process.
"""
