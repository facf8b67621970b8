"""The names of a run's evaluation numbers.

Metric names (``metric_values``; ``--select``, the trackers and ``soundstage runs`` use them):
``SPLIT/PROTOCOL/METRIC`` with the real audio (``val/avsbench-binary/miou``),
``SPLIT/PROTOCOL/VARIANT/METRIC`` with the audio replaced (``val/avsbench-binary/muted/miou``,
``noise:10`` written ``noise_10``), and the sensitivity real − variant as
``SPLIT/PROTOCOL/real-VARIANT/METRIC`` (``val/avsbench-binary/real-swapped/miou``).
"""

from __future__ import annotations


def metric_values(record: dict) -> dict[str, float]:
    """One evaluation record (a line of ``epochs.jsonl``) as named numbers (module docstring)."""
    split, results = record.get("split", "val"), record.get("eval", {})
    values = {}
    for variant, result in results.items():
        for protocol, numbers in protocol_numbers(result).items():
            for metric in ("miou", "fscore"):
                if numbers.get(metric) is not None:
                    values[metric_name(split, protocol, variant, metric)] = float(numbers[metric])
    for variant in results:
        if variant == "real":
            continue
        for protocol in protocol_numbers(results[variant]):
            for metric in ("miou", "fscore"):
                real = values.get(metric_name(split, protocol, "real", metric))
                other = values.get(metric_name(split, protocol, variant, metric))
                if real is not None and other is not None:
                    values[metric_name(split, protocol, f"real-{variant}", metric)] = real - other
    return values


def protocol_numbers(result: dict) -> dict[str, dict]:
    """protocol -> its miou/fscore in one variant's result (records from before ``protocols``:
    the one protocol scored)."""
    return result.get("protocols") or {result.get("protocol", "protocol"): result}


def metric_name(split: str, protocol: str, variant: str, metric: str) -> str:
    middle = [] if variant == "real" else [variant.replace(":", "_")]
    return "/".join([split, protocol, *middle, metric])
