"""Triton serving: what each model does, the python-backend adapter, repository writers, the server launcher."""
