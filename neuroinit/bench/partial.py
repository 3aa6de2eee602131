"""The results of a bench run as they land (``OUT.partial.jsonl`` beside ``--json OUT``), so that an interrupted
run loses nothing: ``neuroinit bench ... --json OUT --resume`` keeps the configurations already timed and times
the rest.

The file's first line is a header holding the run's configuration (the one a resume must match), then one line
per result row (:class:`~neuroinit.bench.timing.Result` as a dict). A line cut short by a kill is ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from neuroinit._util import json_safe

__all__ = ["PartialResults", "comparable_config"]

# configuration fields that do not change what a row measures: a resume may differ in them
_FREE = ("recalibrate", "memory_scaling")


def comparable_config(cfg) -> dict:
    """``cfg`` (a BenchConfig) as plain JSON values, without the fields a resume may change."""
    d = json.loads(json.dumps(json_safe(asdict(cfg)), default=str))
    for k in _FREE:
        d.pop(k, None)
    return d


class PartialResults:
    """``OUT.partial.jsonl`` of the bench run writing ``OUT``."""

    def __init__(self, json_out: str | Path) -> None:
        self.path = Path(str(json_out) + ".partial.jsonl")

    def rows(self) -> list[dict]:
        """The result rows on file (none where there is no file)."""
        return self._read()[1]

    def _read(self) -> tuple[dict | None, list[dict]]:
        if not self.path.exists():
            return None, []
        header, rows = None, []
        for k, line in enumerate(self.path.read_text().splitlines()):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run may be cut short
            if k == 0 and isinstance(item, dict) and "bench_partial" in item:
                header = item
            elif isinstance(item, dict) and "method" in item:
                rows.append(item)
        return header, rows

    def resumable_rows(self, cfg) -> list[dict]:
        """The rows of an interrupted run of the same configuration as ``cfg``; ValueError (one line) where
        there is no such file or it was made with another configuration."""
        header, rows = self._read()
        if header is None:
            raise ValueError(f"Cannot resume: {self.path} does not exist or holds no bench header (nothing was "
                             "interrupted); run without --resume")
        want = comparable_config(cfg)
        stored = {k: v for k, v in header.get("config", {}).items() if k not in _FREE}
        diff = sorted(k for k in set(want) | set(stored) if want.get(k) != stored.get(k))
        if diff:
            parts = ", ".join(f"{k}: stored {stored.get(k)!r} vs {want.get(k)!r}" for k in diff)
            raise ValueError(f"Cannot resume from {self.path}: it was made with another configuration ({parts}); "
                             "give the same options, or delete the file to start over")
        return rows

    def begin(self, cfg, *, resume: bool) -> list[dict]:
        """Start the file for a run of ``cfg`` and return the rows it reuses: with ``resume`` those of the
        interrupted run (:meth:`resumable_rows`), else none -- and a ValueError (one line) where an interrupted
        run's results are on file, which a new run would otherwise drop."""
        if resume:
            keep = self.resumable_rows(cfg)
        else:
            left = self.rows()
            if left:
                raise ValueError(f"{self.path} holds {len(left)} results of an interrupted run: add --resume to "
                                 "continue it (same options), or delete the file to start over")
            keep = []
        self.start(cfg, keep)
        return keep

    def start(self, cfg, keep: list[dict]) -> None:
        """Begin the file for a run of ``cfg``: the header, then the rows ``keep`` (a resumed run's)."""
        lines = [json.dumps({"bench_partial": 1, "config": comparable_config(cfg)})]
        lines += [json.dumps(json_safe(r)) for r in keep]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)

    def append(self, res) -> None:
        """Add one result row (a Result)."""
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(asdict(res))) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
