"""Endpoint specs: comma lists, dns:NAME:PORT (every address, re-resolved), file:PATH (re-read),
and the announce file a server writes."""

from __future__ import annotations

import pytest

from datasvc.service import membership
from datasvc.service.membership import Membership, announce, parse_spec, withdraw


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_static_list_and_bad_items():
    assert Membership("tcp://a:1, tcp://b:2,").current() == ["tcp://a:1", "tcp://b:2"]
    for bad in ("", "a:1", "dns:name", "dns:name:0", "dns::5555"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_dns_gives_every_address_and_is_re_resolved(monkeypatch):
    answers = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "fd00::3"]]

    def fake(name, port, type=None):
        assert (name, port) == ("datasvc.ml.svc", 5555)
        return [(2, 1, 6, "", (a, port)) for a in answers[0]]

    monkeypatch.setattr(membership.socket, "getaddrinfo", fake)
    clock = Clock()
    m = Membership("dns:datasvc.ml.svc:5555", refresh=2.0, clock=clock)
    assert m.current() == ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]
    answers.pop(0)
    assert len(m.current()) == 2 and m.current()[0] == "tcp://10.0.0.1:5555"  # not yet due
    clock.t = 2.5
    assert m.current() == ["tcp://10.0.0.2:5555", "tcp://[fd00::3]:5555"]


def test_dns_failure_keeps_the_last_answer(monkeypatch):
    calls = []

    def flaky(name, port, type=None):
        calls.append(name)
        if len(calls) > 1:
            raise OSError("Temporary failure in name resolution")
        return [(2, 1, 6, "", ("10.1.1.1", port))]

    monkeypatch.setattr(membership.socket, "getaddrinfo", flaky)
    m = Membership("dns:x:1", refresh=0)
    assert m.current() == ["tcp://10.1.1.1:1"]
    assert m.current() == ["tcp://10.1.1.1:1"] and len(calls) == 2


def test_real_resolver_on_localhost():
    got = Membership("dns:localhost:5555").current()
    assert "tcp://127.0.0.1:5555" in got or "tcp://[::1]:5555" in got


def test_file_is_re_read_and_announce_withdraw(tmp_path):
    path = tmp_path / "servers"
    clock = Clock()
    m = Membership(f"file:{path},tcp://fixed:1", refresh=1.0, clock=clock)
    assert m.current() == ["tcp://fixed:1"]  # no file yet: no servers from it
    announce(path, "tcp://10.0.0.5:5555")
    announce(path, "tcp://10.0.0.6:5555")
    announce(path, "tcp://10.0.0.5:5555")  # once only
    path.write_text(path.read_text() + "# a comment\n\n")
    clock.t = 1.0
    assert m.current() == ["tcp://10.0.0.5:5555", "tcp://10.0.0.6:5555", "tcp://fixed:1"]
    withdraw(path, "tcp://10.0.0.5:5555")
    clock.t = 2.0
    assert m.current() == ["tcp://10.0.0.6:5555", "tcp://fixed:1"]
