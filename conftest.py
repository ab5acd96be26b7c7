import pytest

# The project's own fixtures come from the opt-in plugin that plugin authors use too.
pytest_plugins = ["snapcore.testing"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-cycles",
        type=int,
        default=3,
        help="checkpoint → damage → restore cycles of the SQLite soak (tests/test_soak.py; default 3)",
    )
