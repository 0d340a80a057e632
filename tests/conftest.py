"""Shared pytest configuration for all tiers."""

from hypothesis import HealthCheck, settings

# Property tests judge correctness, not speed: on a shared 2-core CI machine a slow example
# must not fail a run (hypothesis' default 200 ms deadline did, intermittently).
settings.register_profile(
    "oe", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("oe")
