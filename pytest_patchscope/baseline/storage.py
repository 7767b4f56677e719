"""Reading and writing baseline files, so that a baseline is never lost or mixed.

- Every write is atomic (a temp file, fsync, rename): a run killed at any moment leaves the old
  file or the new one. Temp files of killed writers are removed by the next write.
- An update is a read-merge-write under a lock on the baseline's folder, so two concurrent
  update runs (two CI jobs, two ``-k`` subsets) merge: neither loses the other's entries.
- One file holds one checkpoint, in one dtype, of one architecture; an update that would mix two is refused.
- An update (and a rewrite of a readable file) keeps each stored number that this run reproduced
  within ``serializer.NOISE_TOLERANCE``, so re-recording an unchanged model rewrites the file byte
  for byte, whatever the thread count or xdist layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from pytest_patchscope.baseline.serializer import REWRITE_OPTION, BaselineFile, Entry, describe_architecture, describe_checkpoint, from_json, settle, to_json
from pytest_patchscope.errors import BaselineError
from pytest_patchscope.fileio import atomic_write, file_lock, remove_stale_temps


def read_baseline(path: str | os.PathLike[str]) -> BaselineFile | None:
    """The baseline at ``path``; None when there is no file; a BaselineError when it is unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"cannot read baseline {path}: {exc}. Check its permissions, or delete it.") from exc
    return from_json(text, path)


@dataclass
class UpdateResult:
    """What an update did: the file as written, and what happened to entries this run did not record."""

    baseline: BaselineFile
    recorded: int
    removed: list[str] = field(default_factory=list)
    kept_unused: list[str] = field(default_factory=list)
    stale_temps: list[Path] = field(default_factory=list)


def _checkpoints(entries: Mapping[str, Entry]) -> dict[tuple[str, str, str], list[str]]:
    found: dict[tuple[str, str, str], list[str]] = {}
    for key, entry in entries.items():
        found.setdefault((entry.profile.model, entry.profile.weights_hash, entry.profile.dtype), []).append(key)
    return found


def _one_checkpoint(path: Path, recorded: Mapping[str, Entry]) -> tuple[str, str, str, dict[str, int]]:
    """The single (model, weights hash, dtype, architecture) of this run's entries; a BaselineError if several."""
    found = _checkpoints(recorded)
    if len(found) > 1:
        listing = "; ".join(f"{describe_checkpoint(*ckpt)}: {len(keys)} probe(s), e.g. {keys[0]}" for ckpt, keys in found.items())
        raise BaselineError(
            f"baseline {path} not written: this run recorded probes of {len(found)} checkpoints ({listing}), and one "
            "baseline file holds one checkpoint. Give each checkpoint's tests their own run and baseline file."
        )
    (model, weights_hash, dtype), keys = next(iter(found.items()))
    return model, weights_hash, dtype, dict(recorded[keys[0]].profile.architecture)


def update_baseline(
    path: str | os.PathLike[str],
    recorded: Mapping[str, Entry],
    *,
    may_remove: Callable[[str, Entry], bool] = lambda key, entry: False,
    rewrite: bool = False,
) -> UpdateResult:
    """Merge ``recorded`` into the baseline at ``path`` under a lock, and write it atomically.

    Entries this run did not record are removed where ``may_remove(key, entry)`` says so (the whole
    suite ran, and that entry's test ran and passed), and kept otherwise. ``rewrite`` starts from an
    empty file: an unreadable or older file is replaced, and no unrecorded entry is kept.
    The merged file must hold one checkpoint and one architecture, else nothing is written.
    """
    path = Path(path)
    if not recorded:
        raise BaselineError(f"baseline {path} not written: this run recorded no probe.")
    model, weights_hash, dtype, architecture = _one_checkpoint(path, recorded)
    with file_lock(path.parent):
        stale = remove_stale_temps(path)
        try:
            existing = read_baseline(path)
        except BaselineError:
            if not rewrite:
                raise
            existing = None
        before = {} if existing is None else existing.entries  # numbers within noise of these are kept
        if existing is None:
            existing = BaselineFile(path, model=model, weights_hash=weights_hash, architecture=architecture, dtype=dtype)
        unused = {key: entry for key, entry in existing.entries.items() if key not in recorded}
        removed = sorted(key for key, entry in unused.items() if rewrite or may_remove(key, entry))
        kept = sorted(set(unused) - set(removed))
        if existing.architecture and architecture and existing.architecture != architecture and kept:
            raise BaselineError(
                f"baseline {path} not written: it holds a model of another architecture ({describe_architecture(existing.architecture)}) "
                f"than this run ({describe_architecture(architecture)}), so its layer indices mean something else. "
                f"Record this architecture into another baseline file, or pass {REWRITE_OPTION} to replace this one."
            )
        if kept and (existing.model, existing.weights_hash, existing.dtype or dtype) != (model, weights_hash, dtype):
            raise BaselineError(
                f"baseline {path} not written: it would mix two checkpoints (or dtypes). This run recorded "
                f"{describe_checkpoint(model, weights_hash, dtype)}, but {len(kept)} entries it did not record would stay from "
                f"{describe_checkpoint(existing.model, existing.weights_hash, existing.dtype)} (e.g. {kept[0]}). Run the whole "
                f"suite on the new checkpoint so that every entry is recorded again, or pass {REWRITE_OPTION} to start the "
                "file over on this checkpoint."
            )
        settled = {
            key: entry if key not in before else Entry(settle(entry.profile, before[key].profile), entry.test)
            for key, entry in recorded.items()
        }
        merged = BaselineFile(
            path,
            {**{key: existing.entries[key] for key in kept}, **settled},
            model,
            weights_hash,
            architecture,
            dtype,
        )
        text = to_json(merged)
        try:
            payload = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BaselineError(
                f"baseline {path} not written: a recorded text holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), "
                "which UTF-8 cannot encode. The previous file, if any, is unchanged; check the probe's strings."
            ) from exc
        try:
            atomic_write(path, payload)
        except OSError as exc:
            raise BaselineError(
                f"cannot write baseline {path}: {exc}. The previous file, if any, is unchanged; "
                "check that the directory exists and is writable."
            ) from exc
    return UpdateResult(merged, len(recorded), removed, kept, stale)
