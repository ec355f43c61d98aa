"""``GET /openapi.json`` and ``GET /<service>/openapi.json``, generated from the registered schemas."""

from __future__ import annotations

import aiohttp
from openapi_spec_validator import validate

from micro import Service


async def test_the_namespace_document_lists_its_services(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.get(base + "/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    validate(document)
    assert "/greeter/call" in document["paths"]
    assert "/store/read" in document["paths"]  # the building blocks live in namespace micro
    assert document["servers"][0]["url"] == base


async def test_a_service_document(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    async with http.get(base + "/greeter/openapi.json") as response:
        document = await response.json()
    validate(document)
    assert set(document["paths"]) >= {"/greeter/call", "/greeter/stream"}
    assert "/store/read" not in document["paths"]


async def test_an_unknown_service_is_404(http: aiohttp.ClientSession, base: str) -> None:
    async with http.get(base + "/nothing/openapi.json") as response:
        assert response.status == 404
        assert (await response.json())["detail"] == "service 'nothing' not found"
