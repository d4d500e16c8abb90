"""The benchmark of issue 5: ours against Dramatiq, Celery and RQ (`make bench`)."""
