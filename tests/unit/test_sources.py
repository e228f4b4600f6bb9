"""rd.data.sources: which folders a user may add as data sources, and under which name."""

from __future__ import annotations

import pytest

from rd.data.sources import (
    ROOTS_ENV,
    SourceError,
    allowed_roots,
    available_sources,
    check_user_folder,
)


def test_added_folders_must_lie_under_an_allowed_root_and_have_a_new_name(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "parts").mkdir(parents=True)
    (allowed / "x" / "builtin").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    roots = [allowed.resolve()]
    name, path = check_user_folder(str(allowed / "x" / ".." / "parts"), [], roots)
    assert (name, path) == ("parts", (allowed / "parts").resolve()) and path.is_absolute()
    for folder, message in ((tmp_path / "other", "outside"), ("relative/parts", "absolute"),
                            (allowed / "missing", "not a folder"),
                            (allowed / "x" / "builtin", "exists already")):
        with pytest.raises(SourceError, match=message):
            check_user_folder(folder, [], roots)
    with pytest.raises(SourceError, match="exists already"):
        check_user_folder(allowed / "parts", ["Parts"], roots)


def test_allowed_roots_come_from_the_environment_then_the_settings(tmp_path, monkeypatch):
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    assert allowed_roots([str(tmp_path)]) == [tmp_path.resolve()]
    assert len(allowed_roots()) == 2  # home and the data home
    monkeypatch.setenv(ROOTS_ENV, f"{tmp_path / 'a'}:relative")
    assert allowed_roots([str(tmp_path)]) == [(tmp_path / "a").resolve()]


def test_remembered_folders_never_shadow_the_reserved_sources(tmp_path, monkeypatch):
    from rd.data import sources as module

    builtin = module.DataSource(module.BUILTIN, tmp_path / "generated", "built-in")
    monkeypatch.setattr(module, "builtin_source", lambda *_: builtin)  # not generated here
    sources = available_sources({"builtin": tmp_path, "../x": tmp_path, "mine": tmp_path})
    names = [s.name for s in sources]
    assert names.count("builtin") == 1 and "../x" not in names and "mine" in names
    assert sources[0].root != tmp_path
