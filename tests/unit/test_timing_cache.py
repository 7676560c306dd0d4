"""The start-up timing cache: an entry is found by its key alone, and no failure to read or write
one stops a start."""

import json
import os

import pytest

from loramux.server import timing_cache
from loramux.server.timing_cache import TimingCache

KEY = {"cpu": ["Some CPU", "x86_64", 2**20, 2, "AVX512"], "weights": [[64, 32, "torch.float32", False]]}


def test_an_entry_is_found_by_its_key_only(tmp_path):
    cache = TimingCache(tmp_path / "timings")
    assert cache.get("base-linear", KEY) is None
    cache.put("base-linear", KEY, {"timings": {"1": [0.2, 0.1]}})
    assert cache.get("base-linear", KEY) == {"timings": {"1": [0.2, 0.1]}}
    assert cache.get("base-linear", {**KEY, "cpu": ["Other CPU", *KEY["cpu"][1:]]}) is None
    assert cache.get("other-kind", KEY) is None
    assert not list((tmp_path / "timings").glob(".tmp-*"))  # written whole, then renamed


def test_a_foreign_or_damaged_entry_is_a_miss(tmp_path, caplog):
    cache = TimingCache(tmp_path)
    path = cache.path("base-linear", KEY)
    for text in ("{oops", json.dumps([1, 2]), json.dumps({"key": {**KEY, "cpu": []}, "value": {}}),
                 json.dumps({"key": KEY, "value": [1]})):
        path.write_text(text)
        assert cache.get("base-linear", KEY) is None, text
    assert "unreadable" in caplog.text


def test_a_failed_write_costs_only_the_entry(tmp_path, caplog):
    (tmp_path / "timings").write_text("a file where the folder should be")
    cache = TimingCache(tmp_path / "timings")
    with caplog.at_level("INFO"):
        cache.put("base-linear", KEY, {"timings": {}})
    assert cache.get("base-linear", KEY) is None and "could not keep the start-up timing" in caplog.text


def test_the_least_recently_used_entries_go_past_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(timing_cache, "KEEP", 3)
    cache = TimingCache(tmp_path)
    keys = [{**KEY, "n": i} for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put("base-linear", key, {"i": i})
        os.utime(cache.path("base-linear", key), ns=(i * 10**9, i * 10**9))  # written in this order
    assert cache.get("base-linear", keys[0]) == {"i": 0}  # used last: now the newest
    cache.put("base-linear", keys[3], {"i": 3})
    cache.put("other", keys[4], {"i": 4})  # another kind counts apart
    assert [cache.get("base-linear", k) is not None for k in keys[:4]] == [True, False, True, True]
    assert cache.get("other", keys[4]) == {"i": 4}


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from loramux.adapters.files import write_atomically

    target = tmp_path / "entry.json"
    write_atomically(target, b"old")
    with pytest.raises(TypeError):
        write_atomically(target, b"new ", "not bytes")  # fails after the first chunk is written
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["entry.json"]
