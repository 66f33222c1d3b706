"""The package version (read by pyproject.toml and recorded in every manifest and run.json)."""

__version__ = "0.4.0"
