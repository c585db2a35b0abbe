"""Shared pytest setup. Service fixtures live in tests/fixtures/, one module per real service."""

pytest_plugins = [
    "tests.fixtures.mongo",
    "tests.fixtures.rabbit",
    "tests.fixtures.s3",
]
