"""Suite-wide settings."""

from hypothesis import HealthCheck, settings

# Property tests assert behaviour, not speed: on a 2-core machine shared with other processes, input
# generation can be slow, and a health check failing on that says nothing about the code under test.
settings.register_profile("shunter", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shunter")
