"""Named configs shipped with rhn (YAML files; this file only makes the folder a package)."""
