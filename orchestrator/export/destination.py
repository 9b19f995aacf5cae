"""Where an export goes, and writing it there only once it is verified: the exporter writes into
a private folder, and its files are moved into place (or uploaded) after the check passes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from orchestrator.errors import OrchError
from orchestrator.storage.causes import storage_cause
from orchestrator.storage.rundir import RunDir, is_local_url, join_url, url_to_fs

from .formats import ExportFormat

EXPORT_DIR = "export"  # in the run directory, the default place


def default_name(step: int, fmt: ExportFormat) -> str:
    return f"model-{step}{fmt.ext}"


def resolve_out(out: str | None, run_dir: RunDir, step: int, fmt: ExportFormat) -> str:
    """The file to write: --out (a folder gets the default name inside), else
    RUN_DIR/export/model-STEP.EXT. Local paths come back absolute."""
    name = default_name(step, fmt)
    if out is None:
        out = join_url(run_dir.url, EXPORT_DIR, name)
    if is_local_url(out):
        path = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
        return os.path.join(path, name) if out.endswith("/") or os.path.isdir(path) else path
    return out + name if out.endswith("/") else out


@dataclass(frozen=True)
class Staging:
    """A private local folder the exporter writes `path` (and any file beside it) into."""

    folder: str
    out: str  # the final file

    @property
    def path(self) -> str:
        return os.path.join(self.folder, os.path.basename(self.out))

    def publish(self) -> int:
        """Move (locally) or upload every staged file next to `out`; the total size in bytes.
        The main file goes last, so a reader never finds it without the files it names."""
        main = os.path.basename(self.out)
        names = sorted(os.listdir(self.folder), key=lambda n: n == main)
        size = sum(os.path.getsize(os.path.join(self.folder, n)) for n in names)
        try:
            if is_local_url(self.out):
                parent = os.path.dirname(self.out)
                for n in names:
                    os.replace(os.path.join(self.folder, n), os.path.join(parent, n))
            else:
                fs, path = url_to_fs(self.out)
                parent = path.rsplit("/", 1)[0]
                for n in names:
                    fs.put_file(os.path.join(self.folder, n), f"{parent}/{n}")
        except Exception as exc:  # noqa: BLE001 - any storage's error (OSError, a client's own)
            raise OrchError(f"--out: cannot write {self.out}: {storage_cause(exc)}") from None
        return size


@contextmanager
def staged(out: str) -> Iterator[Staging]:
    """A Staging for `out`, removed with whatever is left in it when the block ends. For a local
    `out` it is next to it (same filesystem: the move is a rename); for a URL, a local temp folder."""
    try:
        if is_local_url(out):
            parent = os.path.dirname(out)
            os.makedirs(parent, exist_ok=True)
            folder = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        else:
            folder = tempfile.mkdtemp(prefix="orch-export-")
    except OSError as exc:
        raise OrchError(f"--out: cannot write {out}: {storage_cause(exc)}") from None
    try:
        yield Staging(folder=folder, out=out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
