"""The YAML run configs, shipped inside the wheel as the package `jeidnn.configs` (see pyproject.toml)."""
