"""A tiny user package outside vlframe, used by tests to check custom_imports and plugins."""
