"""Shared layer of the job functions: models, lifecycle, storage, cache, queue, handlers."""
