"""Validation of the settings read from LRFINDER_ environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lrfinder.settings import Settings


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_settings_api_port_out_of_range(
    monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    monkeypatch.setenv("LRFINDER_API_PORT", port)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert caught.value.errors()[0]["loc"] == ("api_port",)


def test_settings_api_port_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRFINDER_API_PORT", "65535")
    assert Settings().api_port == 65535
