"""Building, validating and reading manifests (one row per clip)."""

from soundstage.manifests.table import read_manifest, write_manifest  # noqa: F401
