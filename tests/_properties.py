"""The hypothesis settings of the property tests: the same examples every run."""

from hypothesis import HealthCheck, settings


def property_settings(max_examples: int = 30) -> settings:
    """Deterministic (derandomised), database-free and without deadlines."""
    return settings(
        derandomize=True,
        deadline=None,
        database=None,
        max_examples=max_examples,
        suppress_health_check=[HealthCheck.too_slow],
    )
