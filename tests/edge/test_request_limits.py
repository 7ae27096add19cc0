"""Request limits at the edge (edge/limits.py): refused before the app parses, nothing written.

Body size per route class (413), JSON depth and array length judged while the body streams
(400), header bytes (431), content types on writes (415), a body that does not arrive in time
(408). Under /fhir the refusals are OperationOutcomes, elsewhere problem+json; every one is
`no-store` and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from carevault.edge.limits import (
    AUTH_MAX_BODY_BYTES,
    JsonArrayTooLong,
    JsonShape,
    JsonTooDeep,
    body_limit,
)
from carevault.identity.roles import Role

FHIR = "application/fhir+json"
PROBLEM = "application/problem+json"
MAX_BODY = 64 * 1024
MAX_DEPTH = 8
MAX_ITEMS = 50
MAX_HEADERS = 4096
TIMEOUT = 1.0
LEAKS = ("Traceback", "sqlalchemy", "orjson", "pydantic", 'File "')


@pytest.fixture
def store() -> str:
    # The edge refuses before any store is touched; what was (not) written is checked through
    # the API, and one store is enough for that.
    return "sqlite"


@pytest.fixture
async def h(harness_factory, settings_factory):
    harness = await harness_factory(
        settings_factory(
            max_body_bytes=MAX_BODY,
            max_json_depth=MAX_DEPTH,
            max_json_array_items=MAX_ITEMS,
            max_header_bytes=MAX_HEADERS,
            request_timeout_seconds=TIMEOUT,
        )
    )
    await harness.add_user("svc.limits", Role.service)
    token = (await harness.login("svc.limits"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "gender": "female", **fields}


def nested_extension(levels: int) -> dict[str, Any]:
    """An extension `levels` deep whose innermost carries a CodeableConcept."""
    ext: dict[str, Any] = {
        "url": "http://example.org/leaf",
        "valueCodeableConcept": {"coding": [{"system": "http://example.org/cs", "code": "x"}]},
    }
    for _ in range(levels - 1):
        ext = {"url": "http://example.org/branch", "extension": [ext]}
    return ext


AT_DEPTH_LIMIT = patient(extension=[nested_extension(2)])
assert depth(AT_DEPTH_LIMIT) == MAX_DEPTH


def over_depth() -> dict[str, Any]:
    body = json.loads(json.dumps(AT_DEPTH_LIMIT))
    body["extension"][0]["extension"][0]["valueCodeableConcept"]["coding"][0]["extension"] = []
    assert depth(body) == MAX_DEPTH + 1
    return body


async def chunks(body: bytes, size: int = 1, pause: float = 0.0) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        if pause:
            await asyncio.sleep(pause)
        yield body[start : start + size]


async def patients(h) -> int:
    response = await h.client.get("/fhir/Patient")
    assert response.status_code == 200, response.text
    return response.json()["total"]


async def create(h, body: Any, **kwargs: Any) -> httpx.Response:
    content = kwargs.pop("content", None)
    if content is None:
        content = json.dumps(body).encode()
    headers = {"content-type": FHIR, **kwargs.pop("headers", {})}
    return await h.client.post("/fhir/Patient", content=content, headers=headers, **kwargs)


def assert_refused(response: httpx.Response, status: int, fhir_code: str | None = None) -> None:
    """An edge refusal: the status, generic body, no-store, the connection closed."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["connection"] == "close"
    for leak in LEAKS:
        assert leak not in response.text
    if fhir_code is None:
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["status"] == status
    else:
        assert response.headers["content-type"] == FHIR
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert [i["code"] for i in body["issue"]] == [fhir_code]


# --- body size ---------------------------------------------------------------------------------


def big_patient(size: int) -> bytes:
    body = json.dumps(patient(name=[{"text": ""}])).encode()
    return body.replace(b'"text": ""', b'"text": "' + b"x" * (size - len(body)) + b'"')


async def test_over_the_limit_by_declared_length_is_413_and_writes_nothing(h):
    body = big_patient(MAX_BODY + 1)
    assert len(body) == MAX_BODY + 1
    assert_refused(await create(h, None, content=body), 413, "too-long")
    fits = big_patient(MAX_BODY)
    assert (await create(h, None, content=fits)).status_code == 201
    assert await patients(h) == 1


async def test_over_the_limit_without_content_length_is_413(h):
    body = big_patient(MAX_BODY + 1)
    response = await create(h, None, content=chunks(body, 4096))
    assert "content-length" not in response.request.headers
    assert_refused(response, 413, "too-long")
    # chunked and within the limit: through
    assert (await create(h, None, content=chunks(big_patient(MAX_BODY), 4096))).status_code == 201
    assert await patients(h) == 1


async def test_a_lying_content_length_is_cut_off_at_the_limit(h):
    body = big_patient(3 * MAX_BODY)
    sent = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in chunks(body, 1024):
            sent += len(chunk)
            yield chunk

    response = await create(h, None, content=counted(), headers={"content-length": "100"})
    assert response.request.headers["content-length"] == "100"
    assert_refused(response, 413, "too-long")
    assert sent <= MAX_BODY + 1024  # the rest was never read
    assert await patients(h) == 0


async def test_auth_and_oauth_bodies_have_a_small_limit(h):
    assert body_limit("/auth/login", MAX_BODY) == AUTH_MAX_BODY_BYTES < MAX_BODY
    padded = {"username": "a", "password": "b", "pad": "x" * AUTH_MAX_BODY_BYTES}
    assert_refused(await h.client.post("/auth/login", json=padded), 413)
    form = {"content-type": "application/x-www-form-urlencoded"}
    token = await h.client.post(
        "/oauth/token", content=b"grant_type=x&pad=" + b"x" * AUTH_MAX_BODY_BYTES, headers=form
    )
    assert_refused(token, 413)
    # The same size is fine for a FHIR write.
    assert (
        await create(h, None, content=big_patient(AUTH_MAX_BODY_BYTES + 100))
    ).status_code == 201


async def test_a_transaction_bundle_takes_the_fhir_limit(h):
    def bundle(size: int) -> bytes:
        entry = {"request": {"method": "POST", "url": "Patient"}, "resource": patient()}
        body = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
        raw = json.dumps(body).encode()
        return raw.replace(b'"gender"', b" " * (size - len(raw)) + b'"gender"')

    over = await h.client.post(
        "/fhir", content=bundle(MAX_BODY + 1), headers={"content-type": FHIR}
    )
    assert_refused(over, 413, "too-long")
    assert await patients(h) == 0
    fits = await h.client.post("/fhir", content=bundle(MAX_BODY), headers={"content-type": FHIR})
    assert fits.status_code == 200, fits.text[:300]
    assert await patients(h) == 1


# --- JSON shape --------------------------------------------------------------------------------


async def test_nesting_at_the_limit_passes_and_one_deeper_is_400(h):
    assert_refused(await create(h, over_depth()), 400, "structure")
    assert await patients(h) == 0
    assert (await create(h, AT_DEPTH_LIMIT)).status_code == 201
    assert await patients(h) == 1


async def test_nesting_is_refused_before_the_app_on_any_route(h):
    at_limit = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    over = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    json_type = {"content-type": "application/json"}
    response = await h.client.post("/auth/login", content=over, headers=json_type)
    assert_refused(response, 400)
    assert "nested" in response.json()["detail"]
    # At the limit the app judges it (a list is no login).
    assert (
        await h.client.post("/auth/login", content=at_limit, headers=json_type)
    ).status_code == 422
    # Unclosed brackets count as they open: no need to wait for the end.
    assert_refused(await h.client.post("/auth/login", content=b"[" * 5000, headers=json_type), 400)


async def test_long_arrays_are_400_and_the_count_is_per_array(h):
    at_limit = patient(name=[{"given": ["Ann"] * MAX_ITEMS}])
    over = patient(name=[{"given": ["Ann"] * (MAX_ITEMS + 1)}])
    response = await create(h, over)
    assert_refused(response, 400, "too-long")
    assert await patients(h) == 0
    assert (await create(h, at_limit)).status_code == 201
    # Many arrays each within the limit: fine, whatever their total.
    many = patient(name=[{"given": ["Ann"] * MAX_ITEMS} for _ in range(MAX_ITEMS)])
    assert (await create(h, many)).status_code == 201
    assert await patients(h) == 2
    # Object members are not array items.
    members = {f"k{i}": i for i in range(MAX_ITEMS * 3)}
    login = await h.client.post("/auth/login", json=members)
    assert login.status_code == 422


async def test_brackets_and_commas_inside_strings_do_not_count(h):
    noisy = "[[[[{{{{" * 20 + "," * 200 + '"\\' + "]]]]"
    body = patient(
        name=[{"family": noisy, "given": ['a\\"[[[[[[[[[[', "\\", '"', "\\u005b" * 30, noisy]}]
    )
    raw = json.dumps(body).encode()
    assert raw.count(b"[") > MAX_DEPTH * 10 and raw.count(b",") > MAX_ITEMS * 3
    created = await create(h, None, content=raw)
    assert created.status_code == 201, created.text[:300]
    assert created.json()["name"][0]["family"] == noisy
    # Non-ASCII text is only bytes to skip over.
    assert (await create(h, patient(name=[{"family": "Ümlaut-[[[[[[[[[[🙂"}]))).status_code == 201


async def test_an_escaped_backslash_does_not_hide_what_follows(h):
    # The value ends in a backslash: "x\\" closes the string, and the nesting after it counts.
    # A scanner that took the last backslash for an escape of the quote would miss it.
    body = json.loads(json.dumps(over_depth()))
    body["name"] = [{"family": "x\\"}]
    raw = json.dumps(body).encode()
    assert b'"x\\\\"' in raw
    assert_refused(await create(h, None, content=raw), 400, "structure")
    long_after = patient(name=[{"family": "y\\\\", "given": ["z"] * (MAX_ITEMS + 1)}])
    assert_refused(await create(h, long_after), 400, "too-long")
    assert await patients(h) == 0


async def test_one_byte_chunks_are_judged_the_same(h):
    refused = [
        (json.dumps(over_depth()).encode(), "structure"),
        (json.dumps(patient(name=[{"given": ["a,b"] * (MAX_ITEMS + 1)}])).encode(), "too-long"),
        (
            b'{"resourceType": "Patient", "name": [{"family": "q\\\\"}], "x": ' + b"[" * 9,
            "structure",
        ),
    ]
    for raw, code in refused:
        assert_refused(await create(h, None, content=chunks(raw, 1)), 400, code)
    assert await patients(h) == 0
    noisy = patient(name=[{"family": 'a\\"[[[[[[[[[[' + "," * 80, "given": ["b"] * MAX_ITEMS}])
    for body in (AT_DEPTH_LIMIT, noisy):
        response = await create(h, None, content=chunks(json.dumps(body).encode(), 1))
        assert response.status_code == 201, response.text[:300]
    assert await patients(h) == 2


def verdict(parts: list[bytes]) -> str:
    shape = JsonShape(MAX_DEPTH, MAX_ITEMS)
    try:
        for part in parts:
            shape.feed(part)
    except JsonTooDeep:
        return "deep"
    except JsonArrayTooLong:
        return "long"
    return "ok"


def test_the_verdict_does_not_depend_on_where_the_body_is_split():
    bodies = [
        json.dumps(AT_DEPTH_LIMIT).encode(),
        json.dumps(over_depth()).encode(),
        json.dumps(patient(name=[{"family": 'a\\"[[[[[[[[[[\\\\', "given": ["b"] * 50}])).encode(),
        json.dumps(patient(name=[{"family": "\\\\\\\\", "given": ["b"] * 51}])).encode(),
        b'{"a": "\\u005b\\"", "b": [[[[[[[1]]]]]]]}',
        '{"a": "é\\\\", "b": [[[[[[[[[1]]]]]]]]]}'.encode(),
    ]
    expected = ["ok", "deep", "ok", "long", "ok", "deep"]
    rng = random.Random(8)
    for body, want in zip(bodies, expected, strict=True):
        assert verdict([body]) == want
        assert verdict([bytes([b]) for b in body]) == want
        for cut in range(len(body) + 1):
            assert verdict([body[:cut], body[cut:]]) == want, (body, cut)
        for _ in range(50):
            cuts = sorted(rng.sample(range(len(body) + 1), 6))
            parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            assert verdict(parts) == want


# --- headers and content types ---------------------------------------------------------------


async def test_oversize_headers_are_431(h):
    assert (await h.client.get("/healthz", headers={"X-Pad": "a" * 1000})).status_code == 200
    assert_refused(await h.client.get("/healthz", headers={"X-Pad": "a" * MAX_HEADERS}), 431)
    many = {f"X-Pad-{i}": "a" * 40 for i in range(100)}
    assert_refused(await h.client.get("/healthz", headers=many), 431)
    refused = await create(h, patient(), headers={"X-Pad": "a" * MAX_HEADERS})
    assert_refused(refused, 431, "too-long")
    assert await patients(h) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/jsonp",
        "text/json",
    ],
)
async def test_writes_need_an_allowed_content_type(h, content_type):
    raw = json.dumps(patient()).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    request = h.client.build_request("POST", "/fhir/Patient", content=raw, headers=headers)
    assert request.headers.get("content-type") == content_type
    assert_refused(await h.client.send(request), 415, "not-supported")
    assert await patients(h) == 0
    created = await create(h, patient())
    assert created.status_code == 201
    update = await h.client.put(
        f"/fhir/Patient/{created.json()['id']}",
        content=json.dumps({**created.json(), "gender": "male"}).encode(),
        headers=headers,
    )
    assert_refused(update, 415, "not-supported")
    read = await h.client.get(f"/fhir/Patient/{created.json()['id']}")
    assert read.json()["gender"] == "female" and read.json()["meta"]["versionId"] == "1"
    login = await h.client.post("/auth/login", content=b'{"username":"a"}', headers=headers)
    assert_refused(login, 415)


@pytest.mark.parametrize("length", ["abc", "-1", "1_0", "+5", " 5", "5 5", "9" * 30])
async def test_a_malformed_content_length_is_400(h, length):
    response = await create(h, patient(), headers={"content-length": length})
    assert_refused(response, 400, "invalid")
    assert await patients(h) == 0


# --- time ----------------------------------------------------------------------------------


async def test_a_body_that_does_not_arrive_in_time_is_408_and_writes_nothing(h):
    raw = json.dumps(patient()).encode()

    async def stalls() -> AsyncIterator[bytes]:
        yield raw[:10]
        await asyncio.sleep(30)  # cancelled: the server stops waiting at TIMEOUT
        yield raw[10:]

    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await create(h, None, content=stalls())
    assert loop.time() - started < TIMEOUT + 5
    assert_refused(response, 408, "timeout")
    login = await h.client.post(
        "/auth/login", content=stalls(), headers={"content-type": "application/json"}
    )
    assert_refused(login, 408)
    assert await patients(h) == 0
    # A slow body that arrives within the time is served.
    slow = await create(h, None, content=chunks(raw, len(raw) // 4 + 1, pause=TIMEOUT / 10))
    assert slow.status_code == 201
    assert await patients(h) == 1
