"""The HDF5 store: stage directories, packed part files, atomic commits and readers."""

from soundstage.cache.reader import StageReader, open_stage, read_result  # noqa: F401
from soundstage.cache.store import StageDir, iter_stage_dirs  # noqa: F401
