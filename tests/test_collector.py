"""GC_THRESHOLD (asgi_stream_core/collector.py): while the gateway serves, the
collector's youngest threshold is the setting's (10,000 by default), and the
process's own comes back when the lifespan ends; 0 leaves it alone."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import serve


@pytest.fixture
def pythons_own() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield (700, 10, 10)
    gc.set_threshold(*before)


@pytest.mark.parametrize(("env", "serving"), [({}, (10_000, 10, 10)), ({"GC_THRESHOLD": "2500"}, (2500, 10, 10)),
                                               ({"GC_THRESHOLD": "0"}, (700, 10, 10))])  # fmt: skip
def test_the_threshold_is_the_settings_while_serving_and_given_back_after(
    pythons_own: tuple[int, int, int], env: dict[str, str], serving: tuple[int, int, int]
) -> None:
    with serve(env) as served:
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
        assert gc.get_threshold() == serving
    assert gc.get_threshold() == pythons_own
