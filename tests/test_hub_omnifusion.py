"""The Hub-id-or-path rule and the stage-then-rename folder writer of `hub_omnifusion`."""

import json
import os
import socket
import subprocess
import sys

import huggingface_hub
import pytest

from modeling_omnifusion.hub_omnifusion import (
    STAGING_OWNER,
    atomic_folder,
    clean_stale_staging,
    hub_model_id,
    is_hub_repo_id,
    make_staging,
    missing_offline,
    replace_folder,
    staging_path,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2", True),
        ("openai/clip-vit-large-patch14-336", True),
        ("./model", False),
        ("/abs/model", False),
        ("~/model", False),
        ("a/b/c", False),
        ("a\\b", False),
        ("bad name", False),
        ("", False),
        (None, False),
    ],
)
def test_hub_repo_id_is_told_from_a_path(name, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_repo_id(name) is expected


def test_an_existing_path_or_one_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "weights").write_text("")
    assert not is_hub_repo_id("model") and not is_hub_repo_id("weights")
    assert not is_hub_repo_id("data/no-such-thing")
    assert is_hub_repo_id("other/model")


def test_hub_model_id_names_cache_folders_and_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snapshot = tmp_path / "hub" / "models--owner--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_model_id(snapshot) == "owner/name"
    assert hub_model_id("owner/name") == "owner/name"
    assert hub_model_id(tmp_path) is None and hub_model_id("./x") is None and hub_model_id("") is None


def test_missing_offline_asks_the_cache_only_when_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    assert not missing_offline("owner/not-cached")
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    assert missing_offline("owner/not-cached")


def test_replace_folder_swaps_a_full_target_and_fills_an_empty_one(tmp_path):
    new, target = tmp_path / "new", tmp_path / "target"
    new.mkdir()
    (new / "a").write_text("new")
    target.mkdir()
    replace_folder(new, target)
    assert (target / "a").read_text() == "new" and not new.exists()
    again = tmp_path / "again"
    again.mkdir()
    (again / "b").write_text("newer")
    replace_folder(again, target)
    assert sorted(os.listdir(target)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["target"]  # the replaced folder is gone


def test_atomic_folder_appears_only_when_the_block_completes(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target, ".writer-") as folder:
        (folder / "config.json").write_text("{}")
        assert not target.exists()
    assert sorted(os.listdir(target)) == ["config.json"]
    with pytest.raises(RuntimeError):
        with atomic_folder(target, ".writer-") as folder:
            (folder / "other.json").write_text("{}")
            raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["config.json"]  # untouched
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left


def test_stale_staging_of_a_dead_process_is_removed_and_its_target_restored(tmp_path):
    target = tmp_path / "out"
    live = make_staging(target, ".writer-")
    stale = make_staging(target, ".writer-")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"pid": dead.pid, "host": socket.gethostname(), "output_dir": str(target)}
    (stale / STAGING_OWNER).write_text(json.dumps(owner))
    (stale / "replaced").mkdir()
    (stale / "replaced" / "config.json").write_text('{"earlier": true}')
    assert clean_stale_staging(tmp_path, ".writer-") == [stale]
    assert json.loads((target / "config.json").read_text()) == {"earlier": True}
    assert live.is_dir() and not stale.exists()


def test_staging_path_is_the_hidden_partial_sibling(tmp_path):
    assert staging_path(tmp_path / "checkpoint-4") == tmp_path / ".checkpoint-4.partial"
