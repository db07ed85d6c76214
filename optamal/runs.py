"""The run directory store.

Commands talk to each other only through run directories on disk:
``<runs_dir>/<command>/<name-or-timestamp>/`` holding

- ``manifest.json``: schema version, optamal version, command line, resolved config,
  seed, versions, device, host, start/end times, ``status`` and error message;
- ``config.json``: the resolved config alone;
- tidy long-format CSV metrics and artifacts.

Every write goes to a temporary file in the same folder and is renamed into place,
so a reader never sees a half-written file. :meth:`Run.track` marks the run
``completed``, ``failed`` or ``interrupted`` (Ctrl-C) and keeps what was written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import platform
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from optamal import __version__
from optamal.errors import OptamalError, UnsafeFileError

SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "failed", "interrupted")


# --------------------------------------------------------------------------- atomic I/O
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_csv(path: str | os.PathLike, frame: "Any") -> None:
    """Write a pandas DataFrame (or a list of dict rows) atomically as CSV."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(list(frame))
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike, what: str = "file") -> Any:
    """Load a tensor file with ``weights_only=True``: a file carrying code is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise OptamalError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long and styled; keep only what names the offending object
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand [^\s]+)", text)
        detail = found.group(1) if found else "pickled objects"
        raise UnsafeFileError(f"refusing to load {what} {path}: it holds more than tensors "
                              f"({detail}); a weights-only file is required") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways (KeyError, ...)
        known = isinstance(exc, (RuntimeError, EOFError, OSError, ValueError))
        first = str(exc).strip().splitlines()[0] if known and str(exc).strip() else "not a tensor file"
        raise OptamalError(f"cannot read {what} {path}: {first}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OptamalError(f"{what} not found: {path}") from None
    except OSError as exc:   # a folder in its place, no permission, ...
        raise OptamalError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OptamalError(f"malformed {what} {path}: {exc}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run directory and its manifest."""

    path: Path
    manifest: dict[str, Any]
    write: bool = True   # False on non-zero ranks of a distributed run: rank 0 alone writes

    @property
    def command(self) -> str:
        return self.manifest["command"]

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    def file(self, name: str) -> Path:
        return self.path / name

    # -- creation ------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, command: str, config: dict[str, Any], *,
               name: str | None = None, seed: int | None = None, device: str = "cpu",
               extra: dict[str, Any] | None = None, write: bool = True) -> "Run":
        """Make ``<runs_dir>/<command>/<name or timestamp>/`` and write its manifest
        (``write=False``: describe the run without touching the disk)."""
        base = Path(runs_dir) / command
        if name is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = stamp
            n = 1
            while (base / name).exists():
                n += 1
                name = f"{stamp}-{n}"
        path = base / name
        if write and path.exists() and any(path.iterdir()):
            raise OptamalError(f"run folder {path} already exists; pick another --name")
        if write:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptamalError(f"cannot create run folder {path}: {exc.strerror}") from None
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "optamal_version": __version__,
            "command": command,
            "name": name,
            "argv": list(sys.argv),
            "config": config,
            "seed": seed,
            "device": device,
            "versions": _versions(),
            "host": socket.gethostname(),
            "started": _now(),
            "ended": None,
            "status": "running",
            "error": None,
        }
        if extra:
            manifest.update(extra)
        run = cls(path, manifest, write)
        try:
            run.save_manifest()
            if write:
                atomic_write_json(path / "config.json", config)
        except OSError as exc:   # e.g. a full disk: one line, and the folder says failed
            msg = os_error_message(exc, path)
            run._finish_quietly("failed", msg)
            raise OptamalError(msg) from None
        return run

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        manifest = read_json(path / "manifest.json", "manifest")
        if not isinstance(manifest, dict) or "command" not in manifest:
            raise OptamalError(f"malformed manifest {path / 'manifest.json'}: no 'command' field")
        if not isinstance(manifest.get("config", {}), dict):
            raise OptamalError(f"malformed manifest {path / 'manifest.json'}: 'config' is not a mapping")
        ver = manifest.get("schema_version")
        if not isinstance(ver, int) or ver > SCHEMA_VERSION:
            raise OptamalError(
                f"manifest {path / 'manifest.json'} has schema version {ver!r}; this optamal "
                f"({__version__}) reads up to {SCHEMA_VERSION}: upgrade optamal")
        return cls(path, manifest)

    def save_manifest(self) -> None:
        if self.write:
            atomic_write_json(self.path / "manifest.json", self.manifest)

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.save_manifest()

    def finish(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        self.manifest["status"] = status
        self.manifest["error"] = error
        self.manifest["ended"] = _now()
        try:
            started = _dt.datetime.fromisoformat(self.manifest["started"])
            self.manifest["wall_seconds"] = round(
                (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 3)
        except (KeyError, ValueError, TypeError):
            pass
        self.save_manifest()

    @contextlib.contextmanager
    def track(self) -> Iterator["Run"]:
        """Mark the run completed / failed / interrupted however the block ends."""
        try:
            yield self
        except KeyboardInterrupt:
            self._finish_quietly("interrupted", "interrupted (Ctrl-C or SIGTERM); the run folder keeps what was written")
            raise
        except OptamalError as exc:
            self._finish_quietly("failed", str(exc))
            raise
        except OSError as exc:
            # The environment's fault (disk full, folder not writable, ...), not a bug: a
            # one-line user error, with the run marked failed when the manifest still writes.
            msg = os_error_message(exc, self.path)
            self._finish_quietly("failed", msg)
            raise OptamalError(msg) from None
        except BaseException as exc:
            self._finish_quietly("failed", f"{type(exc).__name__}: {exc}")
            raise
        else:
            try:
                self.finish("completed")
            except OSError as exc:
                raise OptamalError(os_error_message(exc, self.path)) from None

    def _finish_quietly(self, status: str, error: str) -> None:
        """Record how the run ended if the manifest can still be written; never mask the
        error that ended it."""
        try:
            self.finish(status, error)
        except OSError:
            pass


def os_error_message(exc: OSError, run_path: str | os.PathLike) -> str:
    """One line for an OSError raised inside run ``run_path``."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return " ".join(f"I/O error in run {run_path}: {what}{where}".split())


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = str(torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


def find_runs(runs_dir: str | os.PathLike, command: str | None = None, *,
              status: str | None = "completed", **where: Any) -> list[Run]:
    """Runs under ``runs_dir`` (any depth), oldest first, filtered by command, status and
    config values (``pool="large"``). Unreadable manifests are skipped."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found: list[Run] = []
    for mf in root.rglob("manifest.json"):
        try:
            run = Run.load(mf.parent)
        except OptamalError:
            continue
        if command is not None and run.command != command:
            continue
        if status is not None and run.status != status:
            continue
        if any(run.config.get(k) != v for k, v in where.items()):
            continue
        found.append(run)
    found.sort(key=lambda r: (r.manifest.get("started") or "", str(r.path)))
    return found


def latest_run(runs_dir: str | os.PathLike, command: str, **where: Any) -> Run | None:
    runs = find_runs(runs_dir, command, **where)
    return runs[-1] if runs else None
