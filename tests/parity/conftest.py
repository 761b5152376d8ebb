from tests.ray_fixtures import ray_session  # noqa: F401
