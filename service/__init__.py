"""aat-serve's HTTP service: FastAPI app, batching engine, bundle store and registry, auth,
metrics. Imports ``adapters``; never ``training``.
"""
