"""The test stack's own guarantees: private servers that clean up after themselves."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import stack


def test_redis_server_moves_off_taken_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(
            stack, "free_port", lambda: next(ports, None) or socket_port()
        )
        with stack.redis_server(tmp_path) as server:
            assert server.port != taken
            assert server.alive()


def socket_port() -> int:
    """Return a port nothing listens on, without going through stack.free_port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_redis_server_stops_on_exit(tmp_path: Path) -> None:
    with stack.redis_server(tmp_path) as server:
        pass
    assert not server.alive()


def test_redis_server_stops_after_error(tmp_path: Path) -> None:
    servers: list[stack.RedisServer] = []
    with (
        pytest.raises(RuntimeError, match="inside"),
        stack.redis_server(tmp_path) as server,
    ):
        servers.append(server)
        raise RuntimeError("inside")
    assert not servers[0].alive()
