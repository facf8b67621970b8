"""A PyTorch ``Dataset`` joining a manifest with stage caches by clip id — what training consumes.

A clip missing from a cache is never papered over: by default building the dataset fails and
names the clips; ``missing="drop"`` leaves them out explicitly and says how many.
"""

from __future__ import annotations

import numpy as np
import torch

from soundstage.cache.reader import StageReader
from soundstage.cache.table import read_manifest


class CachedClips(torch.utils.data.Dataset):
    """Items are ``{"clip_id", "row": manifest row, <name>: {field: tensor|str|list}}``.

    ``stages`` maps a name of your choice to a stage directory (or a ``StageReader``);
    ``fields`` optionally restricts each to some fields. Filters select manifest rows by column
    value (e.g. ``split="train"``). Readers open their files lazily in each worker process.
    Which output of a stage: ``soundstage.train.cues.select_output(cache, "hubert", "layer=9")``
    gives its ``StageDir`` (``.path``) by the stage's parameters, no fingerprint to copy.

    Batches: clips differ in length (5 frames, 10 frames, ...), so torch's default collation,
    which stacks, cannot batch them. Use ``ds.loader(batch_size=12)``, or pass
    ``collate_fn=ds.collate_fn`` (``collate_clips``) to your own ``DataLoader``: ids and rows
    become lists, a field whose clips all have one shape is stacked, any other is a list of
    per-clip tensors.
    """

    def __init__(
        self,
        manifest: str,
        stages: dict,
        fields: dict | None = None,
        missing: str = "error",
        as_tensors: bool = True,
        log=print,
        **filters,
    ):
        if missing not in ("error", "drop"):
            raise ValueError("missing must be 'error' or 'drop'")
        df = read_manifest(manifest)
        for column, value in filters.items():
            if column not in df.columns:
                raise KeyError(f"manifest {manifest} has no column {column!r}")
            df = df[df[column].isin([value] if isinstance(value, str) else list(value))]
        fields = fields or {}
        self.readers = {
            name: src if isinstance(src, StageReader) else StageReader(src, fields=fields.get(name))
            for name, src in stages.items()
        }
        rows = df.to_dict("records")
        absent = {name: [r["clip_id"] for r in rows if r["clip_id"] not in rd] for name, rd in self.readers.items()}
        absent = {k: v for k, v in absent.items() if v}
        if absent:
            listing = "; ".join(
                f"{name}: {len(ids)} clips (e.g. {', '.join(ids[:3])})" + _stale_note(self.readers[name], ids)
                for name, ids in absent.items()
            )
            if missing == "error":
                raise KeyError(
                    f"clips of the manifest missing from the cache — {listing}. "
                    "Run the stage(s) for them, or pass missing='drop' to leave them out"
                )
            log(f"leaving out clips missing from the cache — {listing}")
            gone = {cid for ids in absent.values() for cid in ids}
            rows = [r for r in rows if r["clip_id"] not in gone]
        self.rows = rows
        self.as_tensors = as_tensors

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def collate_fn(self):
        return collate_clips

    def loader(self, batch_size: int = 1, **options) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over the clips with ``collate_clips`` (``options``: DataLoader's)."""
        return torch.utils.data.DataLoader(self, batch_size=batch_size, collate_fn=collate_clips, **options)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = {"clip_id": row["clip_id"], "row": row}
        for name, reader in self.readers.items():
            values = reader[row["clip_id"]]
            item[name] = {k: self._convert(v) for k, v in values.items()} if self.as_tensors else values
        return item

    @staticmethod
    def _convert(value):
        if isinstance(value, np.ndarray) and value.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, np.generic):
            return torch.tensor(value.item())
        return value


def _stale_note(reader: StageReader, ids: list) -> str:
    """Why the first clips of ``ids`` held only in an outdated version are not served, if any are."""
    stale = [cid for cid in ids if cid in reader.withdrawn]
    if not stale:
        return ""
    return f", {len(stale)} of them held only as computed from older inputs ({stale[0]}: {reader.withdrawn[stale[0]]})"


def collate_clips(items: list[dict]) -> dict:
    """A batch of ``CachedClips`` items: ``clip_id`` and ``row`` as lists; per stage and field,
    the clips' tensors stacked when their shapes agree, else a list (one tensor per clip)."""
    batch = {"clip_id": [it["clip_id"] for it in items], "row": [it["row"] for it in items]}
    for name in items[0]:
        if name in batch:
            continue
        batch[name] = {field: _stack_or_list([it[name][field] for it in items]) for field in items[0][name]}
    return batch


def _stack_or_list(values: list):
    if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
        return torch.stack(values)
    return values
