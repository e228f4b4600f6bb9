"""Issue 13 item 7: the studio listens on this machine only, wherever it is started from."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from app import access

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.mark.parametrize("address, opens", [
    ("localhost", True), ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
    ("[::1]", True), (None, False), ("", False), ("0.0.0.0", False), ("::", False),
    ("192.168.1.5", False), ("myhost.example", False),
])
def test_only_loopback_addresses_open_without_a_password(address, opens):
    assert (access.access_problem(address, None) is None) == opens
    assert access.access_problem(address, "secret") is None  # a password opens any address


@pytest.fixture
def served_on(monkeypatch):
    """Run main.py as a real server bound to ``address`` would (the harness serves nothing)."""
    monkeypatch.setattr(access, "_served", lambda: True)
    previous = config.get_option("server.address")

    def bind(address):
        config.set_option("server.address", address)

    yield bind
    config.set_option("server.address", previous)


def test_started_from_another_folder_it_refuses_without_a_password(served_on, monkeypatch):
    """`cd ~ && streamlit run .../app/main.py` listened on every interface, unauthenticated."""
    monkeypatch.delenv(access.PASSWORD_ENV, raising=False)
    served_on(None)  # no config file read: Streamlit binds all interfaces
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "all network interfaces" in at.error[0].value
    assert access.PASSWORD_ENV in at.error[0].value
    assert not at.sidebar.selectbox  # nothing else was drawn: no data, no jobs


def test_beyond_loopback_every_page_asks_for_the_password(served_on, monkeypatch):
    monkeypatch.setenv(access.PASSWORD_ENV, "correct horse")
    served_on("0.0.0.0")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    at.text_input[0].input("wrong").run()
    at.button[0].click().run()
    assert at.error[0].value == "wrong password"
    assert not at.sidebar.selectbox and access.GRANTED not in at.session_state
