"""Who may open the studio: this machine only, unless a password is set.

Streamlit reads ``.streamlit/config.toml`` from the working directory only, so ``streamlit run
app/main.py`` started from another folder listens on every network interface -- and a visitor
could add server folders and start jobs. The studio therefore checks, wherever it is started
from, where the server listens: on a loopback address (``localhost``, ``127.0.0.1``, ``::1``)
it opens; anywhere else (including no address set, which means all interfaces) every page
first asks for the password in ``$RD_STUDIO_PASSWORD``, and without one it shows only a page
saying how to start it safely. docs/reliability.md describes serving beyond this machine.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

import streamlit as st

PASSWORD_ENV = "RD_STUDIO_PASSWORD"
GRANTED = "rd_access_granted"


def is_loopback(address: str | None) -> bool:
    """Whether a ``server.address`` setting keeps the server on this machine."""
    if not address:
        return False  # unset: Streamlit listens on all interfaces
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def access_problem(address: str | None, password: str | None) -> str | None:
    """Why the studio must not open (None: it may, with the password if one is set)."""
    if is_loopback(address) or password:
        return None
    where = f"address {address}" if address else "all network interfaces (no server.address)"
    return (f"RD Studio is listening on {where}, and no password is set, so anyone who can "
            "reach this machine could use it. Start it from the project folder (its "
            ".streamlit/config.toml listens on localhost) or with `streamlit run app/main.py "
            "--server.address localhost`; to serve other machines, set the environment "
            f"variable {PASSWORD_ENV} before starting it.")


def _served() -> bool:
    """Whether a real server runs this script (streamlit's test harness serves nothing)."""
    from streamlit import runtime
    from streamlit.runtime import Runtime

    return runtime.exists() and isinstance(runtime.get_instance(), Runtime)


def guard() -> None:
    """Stop the page unless the visitor may use the studio (see the module's notes)."""
    if not _served():
        return
    address = st.get_option("server.address")
    password = os.environ.get(PASSWORD_ENV, "")
    problem = access_problem(address, password)
    if problem:
        st.error(problem)
        st.stop()
    if is_loopback(address) or st.session_state.get(GRANTED):
        return
    with st.form("rd_password"):
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Open RD Studio")
    if submitted and hmac.compare_digest(given.encode(), password.encode()):
        st.session_state[GRANTED] = True
        st.rerun()
    if submitted:
        st.error("wrong password")
    st.stop()
