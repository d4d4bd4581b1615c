"""Task bodies that compute, model backends, batching, warm-up and the worker launcher."""
