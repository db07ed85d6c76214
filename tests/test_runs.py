"""The run-directory store: atomic writes, manifests, status tracking, lookup, safe loads."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from pathlib import Path

import pytest

import optamal
from optamal import runs as runs_mod
from optamal.errors import OptamalError
from optamal.runs import (SCHEMA_VERSION, Run, atomic_torch_save, atomic_write_bytes,
                          atomic_write_csv, atomic_write_json, atomic_write_text, find_runs,
                          latest_run, safe_torch_load)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# --------------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\x02")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "c.json", {"x": (1, 2), "p": Path("/q")})
    atomic_write_csv(tmp_path / "d.csv", [{"a": 1, "b": 2.5}, {"a": 3, "b": 4.5}])
    atomic_write_bytes(tmp_path / "sub" / "deeper" / "e.bin", b"z")  # parents created
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\x02"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2], "p": "/q"}
    assert (tmp_path / "d.csv").read_text().splitlines() == ["a,b", "1,2.5", "3,4.5"]
    assert (tmp_path / "sub" / "deeper" / "e.bin").read_bytes() == b"z"
    assert _leftovers(tmp_path) == []
    assert _leftovers(tmp_path / "sub" / "deeper") == []
    # Overwriting replaces the content completely.
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_failed_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}')

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(target, {"new": True})
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    target.write_bytes(b"original")
    real_fsync = os.fsync

    def boom(fd):
        raise KeyboardInterrupt  # even a Ctrl-C mid-write leaves the old file whole

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new content that never lands")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_bytes() == b"original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_json_writer_refuses_unserialisable_and_keeps_old(tmp_path):
    target = tmp_path / "c.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


# --------------------------------------------------------------------------- Run.create
def test_create_writes_manifest_and_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["optamal", "tune-lr", "--pool", "small"])
    cfg = {"pool": "small", "epochs": 2, "grid": [0.1, 0.2]}
    run = Run.create(tmp_path, "tune-lr", cfg, name="r1", seed=7, device="cpu")
    assert run.path == tmp_path / "tune-lr" / "r1"
    assert run.path.is_dir()
    m = json.loads((run.path / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION == 1
    assert m["optamal_version"] == optamal.__version__
    assert m["command"] == "tune-lr"
    assert m["argv"] == ["optamal", "tune-lr", "--pool", "small"]
    assert m["config"] == cfg
    assert m["seed"] == 7
    assert m["device"] == "cpu"
    assert m["versions"]["python"] == platform.python_version()
    import torch

    assert m["versions"]["torch"] == torch.__version__
    assert m["host"] == socket.gethostname()
    assert isinstance(m["started"], str) and m["started"][:2] == "20"
    assert m["status"] == "running"
    assert m["ended"] is None
    assert json.loads((run.path / "config.json").read_text()) == cfg
    assert _leftovers(run.path) == []


def test_create_default_names_are_unique(tmp_path):
    a = Run.create(tmp_path, "tune-lr", {})
    b = Run.create(tmp_path, "tune-lr", {})
    assert a.path != b.path
    assert a.path.parent == b.path.parent == tmp_path / "tune-lr"


def test_create_refuses_existing_non_empty_folder(tmp_path):
    Run.create(tmp_path, "tune-lr", {"a": 1}, name="same")
    before = (tmp_path / "tune-lr" / "same" / "manifest.json").read_text()
    with pytest.raises(OptamalError, match="already exists"):
        Run.create(tmp_path, "tune-lr", {"a": 2}, name="same")
    # The existing run is untouched.
    assert (tmp_path / "tune-lr" / "same" / "manifest.json").read_text() == before
    # An existing but empty folder is fine.
    (tmp_path / "tune-lr" / "empty").mkdir()
    run = Run.create(tmp_path, "tune-lr", {}, name="empty")
    assert (run.path / "manifest.json").is_file()


# --------------------------------------------------------------------------- Run.track
def _manifest(run: Run) -> dict:
    return json.loads((run.path / "manifest.json").read_text())


def test_track_completed(tmp_path):
    run = Run.create(tmp_path, "tune-lr", {}, name="ok")
    with run.track():
        (run.path / "x.txt").write_text("kept")
    m = _manifest(run)
    assert m["status"] == "completed"
    assert m["error"] is None
    assert isinstance(m["ended"], str) and m["ended"] >= m["started"]
    assert (run.path / "x.txt").read_text() == "kept"


def test_track_failed_records_the_error(tmp_path):
    run = Run.create(tmp_path, "tune-lr", {}, name="bad")
    with pytest.raises(ValueError):
        with run.track():
            (run.path / "partial.csv").write_text("a\n1\n")
            raise ValueError("exploded at step 3")
    m = _manifest(run)
    assert m["status"] == "failed"
    assert "exploded at step 3" in m["error"]
    assert m["ended"] is not None
    assert (run.path / "partial.csv").exists()

    run2 = Run.create(tmp_path, "tune-lr", {}, name="bad2")
    with pytest.raises(OptamalError):
        with run2.track():
            raise OptamalError("every rate diverged")
    m2 = _manifest(run2)
    assert m2["status"] == "failed" and "every rate diverged" in m2["error"]


def test_track_interrupted(tmp_path):
    run = Run.create(tmp_path, "tune-lr", {}, name="ctrlc")
    with pytest.raises(KeyboardInterrupt):
        with run.track():
            raise KeyboardInterrupt
    m = _manifest(run)
    assert m["status"] == "interrupted"
    assert m["ended"] is not None
    assert m["error"]


# --------------------------------------------------------------------------- lookup
def _make(tmp_path, command, name, config, status):
    run = Run.create(tmp_path, command, config, name=name)
    if status != "running":
        run.finish(status)
    return run


def test_find_runs_and_latest_run_filter(tmp_path):
    a = _make(tmp_path, "tune-lr", "a", {"pool": "large", "problem": "train"}, "completed")
    b = _make(tmp_path, "tune-lr", "b", {"pool": "small", "problem": "train"}, "completed")
    c = _make(tmp_path, "tune-lr", "c", {"pool": "large", "problem": "mlp"}, "failed")
    d = _make(tmp_path, "train-choice", "d", {"pool": "large"}, "completed")
    e = _make(tmp_path, "tune-lr", "e", {"pool": "large", "problem": "mlp"}, "running")
    # Order by start time: force distinct, known timestamps.
    for i, r in enumerate((a, b, c, d, e)):
        r.update(started=f"2030-01-01T00:00:0{i}+00:00")

    names = lambda rs: [r.path.name for r in rs]  # noqa: E731
    assert names(find_runs(tmp_path, "tune-lr")) == ["a", "b"]           # completed by default
    assert names(find_runs(tmp_path, "tune-lr", pool="large")) == ["a"]
    assert names(find_runs(tmp_path, "tune-lr", status=None, pool="large")) == ["a", "c", "e"]
    assert names(find_runs(tmp_path, "tune-lr", status="failed")) == ["c"]
    assert names(find_runs(tmp_path, None, pool="large")) == ["a", "d"]
    assert names(find_runs(tmp_path, "tune-lr", pool="large", problem="mlp")) == []
    assert names(find_runs(tmp_path / "nowhere", "tune-lr")) == []

    assert latest_run(tmp_path, "tune-lr").path.name == "b"
    assert latest_run(tmp_path, "tune-lr", pool="large").path.name == "a"
    assert latest_run(tmp_path, "tune-lr", pool="huge") is None
    assert latest_run(tmp_path, "distill") is None

    # A newer completed run becomes the latest.
    f = _make(tmp_path, "tune-lr", "f", {"pool": "large"}, "completed")
    f.update(started="2031-01-01T00:00:00+00:00")
    assert latest_run(tmp_path, "tune-lr", pool="large").path.name == "f"


def test_find_runs_skips_malformed_manifests(tmp_path):
    good = _make(tmp_path, "tune-lr", "good", {"pool": "large"}, "completed")
    bad_json = tmp_path / "tune-lr" / "badjson"
    bad_json.mkdir()
    (bad_json / "manifest.json").write_text("{not json")
    not_dict = tmp_path / "tune-lr" / "list"
    not_dict.mkdir()
    (not_dict / "manifest.json").write_text("[1, 2, 3]")
    no_cmd = tmp_path / "tune-lr" / "nocmd"
    no_cmd.mkdir()
    (no_cmd / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "status": "completed", "config": {"pool": "large"}}))
    future = tmp_path / "tune-lr" / "future"
    future.mkdir()
    (future / "manifest.json").write_text(json.dumps(
        {"schema_version": 99, "command": "tune-lr", "status": "completed",
         "config": {"pool": "large"}}))
    bad_cfg = tmp_path / "tune-lr" / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "command": "tune-lr", "status": "completed", "config": [1]}))
    binary = tmp_path / "tune-lr" / "binary"
    binary.mkdir()
    (binary / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")

    found = find_runs(tmp_path, "tune-lr", pool="large")
    assert [r.path for r in found] == [good.path]
    assert [r.path for r in find_runs(tmp_path, "tune-lr")] == [good.path]
    assert latest_run(tmp_path, "tune-lr").path == good.path


def test_load_refuses_future_schema_and_missing_command(tmp_path):
    future = tmp_path / "future"
    future.mkdir()
    (future / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1,
                                                      "command": "tune-lr"}))
    with pytest.raises(OptamalError, match="schema version"):
        Run.load(future)
    nocmd = tmp_path / "nocmd"
    nocmd.mkdir()
    (nocmd / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(OptamalError, match="command"):
        Run.load(nocmd)
    with pytest.raises(OptamalError, match="not found"):
        Run.load(tmp_path / "missing")
    # A proper one round-trips.
    run = Run.create(tmp_path, "tune-lr", {"pool": "small"}, name="ok", seed=3)
    loaded = Run.load(run.path)
    assert loaded.command == "tune-lr"
    assert loaded.config == {"pool": "small"}
    assert loaded.status == "running"
    assert loaded.manifest["seed"] == 3


# --------------------------------------------------------------------------- safe loads
class _Payload:
    """Unpickling this would call _side_effect: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_side_effect, (self.path,))


def _side_effect(path):
    Path(path).write_text("code ran")
    return "pwned"


class _Custom:
    def __init__(self):
        self.x = 1


def test_safe_torch_load_loads_state_dicts(tmp_path):
    import torch

    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.float64),
          "meta": {"step": 5, "names": ["a", "b"]}}
    atomic_torch_save(tmp_path / "ckpt.pt", sd)
    out = safe_torch_load(tmp_path / "ckpt.pt", "checkpoint")
    assert set(out) == {"w", "b", "meta"}
    assert torch.equal(out["w"], sd["w"]) and out["b"].dtype == torch.float64
    assert out["meta"] == {"step": 5, "names": ["a", "b"]}
    model = torch.nn.Linear(3, 2)
    atomic_torch_save(tmp_path / "m.pt", model.state_dict())
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(safe_torch_load(tmp_path / "m.pt"))
    assert torch.equal(clone.weight, model.weight)


def test_safe_torch_load_refuses_code(tmp_path):
    import torch

    marker = tmp_path / "marker.txt"
    torch.save({"w": torch.ones(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(OptamalError, match="refusing"):
        safe_torch_load(tmp_path / "evil.pt", "checkpoint")
    assert not marker.exists(), "unpickling ran arbitrary code"

    torch.save(_Custom(), tmp_path / "custom.pt")
    with pytest.raises(OptamalError):
        safe_torch_load(tmp_path / "custom.pt")


def test_safe_torch_load_refuses_truncated_and_missing(tmp_path):
    import torch

    torch.save({"w": torch.randn(100, 100)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(OptamalError):
        safe_torch_load(tmp_path / "trunc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(OptamalError):
        safe_torch_load(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("hello, not a tensor file")
    with pytest.raises(OptamalError):
        safe_torch_load(tmp_path / "text.pt")
    with pytest.raises(OptamalError, match="not found"):
        safe_torch_load(tmp_path / "nope.pt", "checkpoint")
