# conf/ is installed as the package `pipeline.conf` (pyproject.toml), so that an installed pipeline finds its
# configs; this file makes it one. The YAML files are the configs.
