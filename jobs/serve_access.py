"""Who may reach ``cappy serve``: the API keys it is given (``--api-key``, ``$CAPPY_API_KEY``) and
the warning for an endpoint bound beyond loopback without one."""

from __future__ import annotations

import argparse
import ipaddress
import os

API_KEY_ENV = "CAPPY_API_KEY"


def api_keys(args: argparse.Namespace) -> list[str]:
    """The raw keys of ``--api-key`` and ``$CAPPY_API_KEY`` (comma-separated), in order, no blanks.
    An empty ``--api-key`` is an error: taken as "no key", it would serve with none."""
    flags = list(getattr(args, "api_key", None) or [])
    if any(not k.strip() for k in flags):
        raise ValueError("--api-key is empty: give the key (or leave the flag out to serve without one)")
    given = flags + os.environ.get(API_KEY_ENV, "").split(",")
    return list(dict.fromkeys(k.strip() for k in given if k.strip()))


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only: 127.0.0.0/8, ::1, localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, keyed: bool) -> str | None:
    """The warning for an endpoint bound beyond loopback without an API key, else None."""
    if keyed or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach it can use it; "
            f"set --api-key or {API_KEY_ENV}")
