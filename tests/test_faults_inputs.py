"""Hostile and damaged inputs that are refused in one line: option files (alias bombs, huge or
deeply nested files, tags), sampler parts that are object arrays or cut short; and the pieces
the fault handling is made of (locks, atomic writes, the fault classifier, redaction).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import digests, error_line, run_cli
from conftest import TINY_DIT, make_checkpoint, write_store

from foundation.atomic import append_line, atomic_file, write_atomic
from foundation.config import CONFIG_MAX_BYTES, read_config_file
from foundation.errors import ConfigError
from foundation.faults import ResourceError, describe_fault, resource_faults
from foundation.locks import Holder, Lock, LockHeldError
from foundation.urls import REDACTED, parse_storage_options, redact_options
from trainer.config import TrainConfig

BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)
CONFIGS = {  # name: (file name, contents, fragment of the one error line)
    "alias bomb": ("bomb.yaml", BOMB, "YAML aliases (*name) are not allowed"),
    "one alias": ("alias.yaml", "lr: &x 0.1\nmin_lr: *x\n", "YAML aliases (*name) are not allowed"),
    "python tag": ("tag.yaml", 'steps: !!python/object/apply:os.system ["true"]\n', "cannot parse"),
    "too large": (
        "big.toml",
        "# x\n" * (CONFIG_MAX_BYTES // 4 + 1),
        "more than an option file needs",
    ),
    "nested yaml": ("deep.yaml", "[" * 50_000, "nested too deeply"),
    "nested json": ("deep.json", '{"a":' * 50_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_option_files_are_refused_fast(tmp_path, case):
    name, text, said = CONFIGS[case]
    path = tmp_path / name
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match=said.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
    ):
        read_config_file(path, TrainConfig, "train")
    assert time.perf_counter() - start < 5  # a bomb costs nothing: refused before expanding
    if case == "alias bomb":  # the user's run: one line, exit 2
        assert said in error_line(run_cli("train", "--config", path))


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


PARTS = {  # name: (write the part 0000000-0000002.npy, fragment of the one error line)
    "object array": (
        lambda p: np.save(p, np.array([Evil(p.parent / "pwned")] * 2, dtype=object)),
        "holds an object array (a pickle); refused (never unpickled)",
    ),
    "cut short": (
        lambda p: p.write_bytes(_npy(np.zeros((2, 32, 32, 3), np.uint8))[:500]),
        "is cut short",
    ),
    "wrong dtype": (
        lambda p: np.save(p, np.zeros((2, 32, 32, 3), np.float64)),
        "not 2 rows of uint8",
    ),
}


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(PARTS))
def test_a_sampler_resume_refuses_a_hostile_part(tiny_vae_dir, tmp_path, case):
    write, said = PARTS[case]
    ckpt = make_checkpoint(tmp_path / "run", tiny_vae_dir)
    out = tmp_path / "out"
    args = ["sample", ckpt, "--out", out, "--n", "4", "--batch-size", "2", "--steps", "2"]
    args += ["--npz", "--device", "cpu"]
    done = run_cli(*args, real=False)
    assert done.returncode == 0, done.stderr
    (out / "samples_4x32x32x3.npz").unlink()  # as if interrupted before the .npz
    (out / "npz_parts").mkdir()
    write(out / "npz_parts/0000000-0000002.npy")
    before = digests(out)
    line = error_line(run_cli(*args, real=False))
    assert "npz_parts/0000000-0000002.npy" in line and said in line
    assert digests(out) == before and not (out / "npz_parts/pwned").exists()


# --- locks ------------------------------------------------------------------------------------


def _holder(**changes) -> bytes:
    me = Holder.me()
    return json.dumps({**me.__dict__, **changes}).encode()


def test_lock_refuses_a_live_holder_and_releases_only_its_own(tmp_path):
    path = tmp_path / "run/.lock"
    first = Lock(path, what="run r").acquire()
    with pytest.raises(LockHeldError, match=rf"run r is in use by pid {os.getpid()} on "):
        Lock(path, what="run r").acquire()
    path.write_bytes(_holder(token="someone-else"))  # taken over meanwhile (e.g. by hand)
    first.release()
    assert path.exists()  # not ours: left alone


@pytest.mark.parametrize(
    ("holder", "stale"),
    [
        ({"pid": 2**22 + 7}, True),  # no such process on this host
        ({"started": -1.0}, True),  # the pid now belongs to a newer process
        ({"boot": "another-boot"}, True),  # the host rebooted since
        ({"host": "node-17"}, False),  # another host: cannot be known
        ({}, False),  # this very process
    ],
)
def test_lock_staleness(tmp_path, holder, stale):
    path = tmp_path / ".lock"
    path.write_bytes(written := _holder(**holder))
    lock = Lock(path, what="x")
    if stale:
        assert lock.acquire().holder is not None
        lock.release()
        assert not path.exists()
    else:
        with pytest.raises(LockHeldError, match=rf"remove {path}"):
            lock.acquire()
        assert path.read_bytes() == written  # untouched


def test_lock_on_fsspec_memory(tmp_path):
    with Lock("memory://locks/x.zarr.lock", what="store x"), pytest.raises(LockHeldError):
        Lock("memory://locks/x.zarr.lock", what="store x").acquire()
    Lock("memory://locks/x.zarr.lock", what="store x").acquire().release()


def test_holder_names_host_pid_and_start():
    me = Holder.me()
    assert me.host == socket.gethostname() and me.pid == os.getpid() and not me.gone()


# --- atomic writes, faults, secrets -------------------------------------------------------------


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    write_atomic(path, "old")
    with pytest.raises(OSError), atomic_file(path) as f:
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    append_line(tmp_path / "log.jsonl", '{"step": 1}')
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n'


FAULTS = {
    "disk full": (
        OSError(errno.ENOSPC, "No space left on device", "/x/y"),
        "out of space writing /x/y",
    ),
    "quota": (OSError(errno.EDQUOT, "Disk quota exceeded"), "over the disk quota"),
    "wrapped text": (RuntimeError("[Errno 28] No space left on device"), "out of space"),
    "memory": (MemoryError("cannot allocate 9 GB"), "out of memory (MemoryError: cannot allocate"),
    "connection": (ConnectionResetError("reset by peer"), "object store request failed"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_faults_are_one_resource_error_line(case):
    error, said = FAULTS[case]
    assert said in describe_fault(error).what
    with (
        pytest.raises(ResourceError, match=r"; (step 2 is intact); .*, then resume with X$") as e,
        resource_faults("training r", intact="step 2 is intact", resume="resume with X"),
    ):
        try:
            raise KeyError("inner")
        except KeyError:
            raise error from None
    assert "\n" not in str(e.value)
    assert describe_fault(ValueError("a bug")) is None  # anything else is not a fault


def test_storage_options_are_redacted_and_never_echoed():
    options = {"endpoint_url": "http://h", "key": "AK", "client_kwargs": {"aws_session_token": "T"}}
    assert redact_options(options) == {
        "endpoint_url": "http://h", "key": REDACTED, "client_kwargs": {"aws_session_token": REDACTED},
    }  # fmt: skip
    assert parse_storage_options(json.dumps(redact_options(options))) == {
        "endpoint_url": "http://h", "client_kwargs": {},
    }  # fmt: skip
    for bad in ('{"secret": "hunter2", ', '["hunter2"]'):
        with pytest.raises(ConfigError) as e:
            parse_storage_options(bad)
        assert "hunter2" not in str(e.value)


def test_out_of_memory_for_a_store_is_one_line(tmp_path, monkeypatch):
    """A store that does not fit in RAM (`--data memory`): one line naming the fault, what is
    intact and what to do; nothing written."""
    store = write_store(tmp_path / "s.zarr", n=16)
    shape = "(1281167, 2, 4, 32, 32) and data type uint8"

    def no_memory(*args, **kwargs):
        raise MemoryError(f"Unable to allocate 9.77 GiB for an array with shape {shape}")

    monkeypatch.setattr("trainer.train.build_batches", no_memory)
    tiny = [a for k, v in TINY_DIT.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    args = ["train", "--store", store, "--run", tmp_path / "run", *tiny, "--batch-size", "8"]
    line = error_line(run_cli(*args, real=False))
    assert "out of memory (MemoryError: Unable to allocate 9.77 GiB" in line
    assert "no checkpoint was written yet" in line and "--data stream" in line
    assert not (tmp_path / "run").exists()


def test_a_garbled_sample_manifest_is_refused(tiny_vae_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", tiny_vae_dir)
    out = tmp_path / "out"
    (out / "npz_parts").mkdir(parents=True)
    (out / "sample.json").write_text('{"checkpoint": ')  # what no atomic write leaves: edited
    before = digests(out)
    args = ["sample", ckpt, "--out", out, "--n", "2", "--steps", "2", "--device", "cpu"]
    assert "sample.json is unreadable" in error_line(run_cli(*args, real=False))
    assert digests(out) == before and not (out / ".lock").exists()
