# The project's own fixtures come from the opt-in plugin that plugin authors use too.
pytest_plugins = ["snapcore.testing"]
