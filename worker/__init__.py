"""Celery worker that runs LR-finder studies from the Redis queue."""
