"""The test helpers' caches: a cached load or build must be indistinguishable from doing it again."""

import torch

from helpers import BuiltTemplates, SavedFolderCache


def test_a_saved_folder_is_read_again_when_a_file_changes_even_at_the_same_size(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"aaaa")
    cache, loads = SavedFolderCache(max_bytes=8), []

    def load():
        loads.append(1)
        return {"data": (tmp_path / "w.bin").read_bytes()}

    first = cache.get(tmp_path, "x", load)
    first["data"] = b"mutated by its caller"
    assert cache.get(tmp_path, "x", load) == {"data": b"aaaa"} and len(loads) == 1  # a copy each time
    (tmp_path / "w.bin").write_bytes(b"bbbb")  # same size, likely the same mtime tick
    assert cache.get(tmp_path, "x", load) == {"data": b"bbbb"} and len(loads) == 2
    assert cache.get(tmp_path, "y", load) and len(loads) == 3  # another reading of the same folder
    cache.get(tmp_path, "z", load)
    assert [key[0] for key in cache.kept] == ["y", "z"]  # past 8 bytes read, the least recently used went out


def test_a_copy_of_a_saved_folder_elsewhere_shares_its_read(tmp_path):
    import shutil

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"aaaa")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cache, loads = SavedFolderCache(), []
    cache.get(tmp_path / "a", "x", lambda: loads.append(1))
    cache.get(tmp_path / "b", "x", lambda: loads.append(1))
    assert len(loads) == 1


def test_a_model_read_through_the_cache_is_named_by_the_folder_asked_for(tmp_path):
    import shutil

    from helpers import auto_model, build_family_model, saved_config

    first = build_family_model("qwen3", tmp_path / "a")
    second = shutil.copytree(first, tmp_path / "b")
    auto_model(first)
    model = auto_model(second)
    assert model.name_or_path == model.config.name_or_path == saved_config(second).name_or_path == str(second)


def test_a_built_template_is_copied_with_the_random_state_its_build_left(tmp_path):
    templates, builds = BuiltTemplates(), []

    def build(folder):
        builds.append(folder)
        folder.mkdir()
        (folder / "w.pt").write_bytes(torch.randn(4).numpy().tobytes())

    torch.manual_seed(0)
    templates.copy("k", tmp_path / "a", build)
    after_build = torch.rand(3)
    torch.manual_seed(123)
    templates.copy("k", tmp_path / "b", build)
    assert len(builds) == 1 and torch.equal(torch.rand(3), after_build)
    assert (tmp_path / "a" / "w.pt").read_bytes() == (tmp_path / "b" / "w.pt").read_bytes()
