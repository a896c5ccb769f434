"""The current API's upload host: multipart rules (pure and over real HTTP),
upload tokens, session expiry, part faults and the upload stats."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_harness import KEY, Harness, serve

from batcher.simulator import SimConfig
from batcher.simulator.uploads import EdgeRefusal, MultipartUpload, UploadSession, etag_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with serve(SimConfig(part_size=4, duration=(1.0, 1.0))) as harness:
        yield harness


def split(data: bytes, part_size: int) -> list[bytes]:
    """The split the protocol allows: full parts, then the rest; an empty file is one part."""
    return [data[i:i + part_size] for i in range(0, len(data), part_size)] or [b""]


def _upload(part_size: int, max_bytes: int = 1 << 30) -> MultipartUpload:
    session = UploadSession("s", "t", "p", "key", part_size, max_bytes, 0.0)
    return MultipartUpload("u", session, part_size)


def _refusal(code: str, call: Any, *args: Any) -> EdgeRefusal:
    with pytest.raises(EdgeRefusal) as caught:
        call(*args)
    assert caught.value.code == code, caught.value
    return caught.value


# -- the rules, pure ---------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), part_size=st.integers(1, 64), seed=st.integers(0, 2**32))
def test_any_allowed_split_in_any_order_with_resends_stores_the_file_exactly(
    data: bytes, part_size: int, seed: int
) -> None:
    upload = _upload(part_size)
    parts = list(enumerate(split(data, part_size), 1))
    rng = random.Random(seed)
    sends = parts + rng.sample(parts, k=rng.randint(0, len(parts)))  # some parts twice
    rng.shuffle(sends)
    resent = 0
    for number, chunk in sends:
        etag, again = upload.put_part(number, chunk)
        assert etag == etag_of(chunk)
        resent += again
    assert resent == len(sends) - len(parts)
    receipts = [{"partNumber": n, "etag": etag_of(c)} for n, c in reversed(parts)]
    assert upload.complete(receipts) == data
    assert upload.complete(receipts) is None  # a lost answer's retry: nothing changes
    assert (upload.size, upload.etag, upload.parts) == (len(data), etag_of(data), {})


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2, 100), data=st.data())
def test_a_short_part_that_is_not_the_last_is_refused(size: int, data: st.DataObject) -> None:
    part_size = data.draw(st.integers(1, size - 1), label="part size")  # two parts or more
    parts = split(bytes(range(size)), part_size)
    upload = _upload(part_size)
    short = data.draw(st.integers(1, len(parts) - 1), label="short part")
    parts[short - 1] = parts[short - 1][:-1]
    receipts = [{"partNumber": n, "etag": upload.put_part(n, c)[0]}
                for n, c in enumerate(parts, 1)]
    _refusal("invalid_part_size", upload.complete, receipts)


def test_the_parts_list_is_checked() -> None:
    upload = _upload(4, max_bytes=10)
    tags = [upload.put_part(n, chunk)[0] for n, chunk in enumerate([b"0123", b"4567", b"89"], 1)]
    r = [{"partNumber": n, "etag": t} for n, t in enumerate(tags, 1)]
    _refusal("invalid_part_order", upload.complete, [r[0], r[2]])  # part 2 missing
    _refusal("invalid_part_order", upload.complete, r[1:])
    _refusal("invalid_part", upload.complete, [r[0], {"partNumber": 2, "etag": "bad"}, r[2]])
    _refusal("bad_request", upload.complete, [r[0], r[0]])
    _refusal("bad_request", upload.complete, [])
    _refusal("bad_request", upload.complete, [{"partNumber": "1", "etag": tags[0]}])
    _refusal("bad_request", upload.complete, [{"partNumber": True, "etag": tags[0]}])
    _refusal("bad_request", upload.complete, "parts")
    assert upload.complete(r) == b"0123456789"
    _refusal("upload_completed", upload.complete, r[:2])
    _refusal("upload_completed", upload.put_part, 1, b"0123")
    _refusal("upload_completed", upload.abort)


def test_part_numbers_sizes_and_the_upload_limit() -> None:
    upload = _upload(4, max_bytes=10)
    assert _refusal("bad_request", upload.put_part, 0, b"x").status == 400
    _refusal("bad_request", upload.put_part, 10_001, b"x")
    assert _refusal("payload_too_large", upload.put_part, 1, b"01234").status == 413
    assert _refusal("upload_too_large", upload.put_part, 3, b"890").status == 413
    upload.put_part(3, b"89")  # exactly at the limit
    empty_last = _upload(2)
    tags = [empty_last.put_part(1, b"ab")[0], empty_last.put_part(2, b"")[0]]
    _refusal("invalid_part_size", empty_last.complete,
             [{"partNumber": n, "etag": t} for n, t in enumerate(tags, 1)])
    upload.abort()
    _refusal("no_such_upload", upload.put_part, 1, b"0123")


# -- over HTTP ---------------------------------------------------------------


async def test_the_whole_upload_in_parts(h: Harness) -> None:
    created = await h.session(10)
    upload = created["upload"]
    assert upload["partSizeBytes"] == 4
    started = await h.edge(upload, "POST", "start")
    assert started.status == 200
    assert started.body == {"uploadId": started.body["uploadId"], "partSizeBytes": 4,
                            "maxBytes": 2 * 1024 ** 3}
    uid = started.body["uploadId"]
    receipts = []
    for number, chunk in enumerate([b"0123", b"4567", b"89"], 1):
        part = await h.edge(upload, "PUT", f"parts/{number}", data=chunk, upload_id=uid)
        assert part.status == 200
        assert part.headers["Content-Type"].startswith("application/json")
        assert part.body == {"partNumber": number, "etag": etag_of(chunk)}
        receipts.append({"partNumber": number, "etag": part.body["etag"]})
    done = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts})
    assert done.status == 200
    assert done.body == {"objectKey": upload["objectKey"], "sizeBytes": 10,
                         "etag": etag_of(b"0123456789")}
    assert h.sim.state.projects[created["apiProjectId"]].audio == b"0123456789"
    stats = h.sim.stats
    assert (stats.uploads_started, stats.parts_received, stats.uploads_completed) == (1, 3, 1)
    assert (stats.parts_resent, stats.api_keys_at_upload_host) == (0, 0)
    assert stats.status_count("edge:parts", 200) == 3
    assert stats.requests == 1  # create_project: the upload host is not the API


async def test_an_empty_file_is_one_empty_part(h: Harness) -> None:
    created = await h.session(0)
    await h.upload(created, b"")
    done = await h.call("complete_project_upload", {"apiProjectId": created["apiProjectId"]})
    assert done.body["sizeBytes"] == 0


async def test_wrong_sizes_missing_parts_and_bad_etags_over_http(h: Harness) -> None:
    upload = (await h.session(10))["upload"]
    uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
    big = await h.edge(upload, "PUT", "parts/1", data=b"01234", upload_id=uid)
    assert big.status == 413
    assert big.body["error"]["code"] == "payload_too_large" and big.body["error"]["message"]
    short = await h.edge(upload, "PUT", "parts/1", data=b"012", upload_id=uid)
    last = await h.edge(upload, "PUT", "parts/2", data=b"45", upload_id=uid)
    receipts = [{"partNumber": 1, "etag": short.body["etag"]},
                {"partNumber": 2, "etag": last.body["etag"]}]
    wrong = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts})
    assert (wrong.status, wrong.body["error"]["code"]) == (400, "invalid_part_size")
    gap = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts[1:]})
    assert gap.body["error"]["code"] == "invalid_part_order"
    receipts[0]["etag"] = "0" * 32
    bad = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts})
    assert bad.body["error"]["code"] == "invalid_part"
    for number, query in (("x", uid), ("1", "nope")):
        reply = await h.edge(upload, "PUT", f"parts/{number}", data=b"0123", upload_id=query)
        assert reply.status in (400, 404), reply.text
    assert (await h.edge(upload, "POST", "complete", body={"uploadId": uid})).status == 400
    assert (await h.edge(upload, "POST", "complete", data=b"{nope")).status == 400


async def test_parts_need_a_content_length(h: Harness) -> None:
    upload = (await h.session(4))["upload"]
    uid = (await h.edge(upload, "POST", "start")).body["uploadId"]

    async def chunked() -> AsyncIterator[bytes]:
        yield b"0123"

    url = f"{upload['edgeBaseUrl']}/v1/uploads/parts/1"
    async with h.http.put(url, data=chunked(), params={"uploadId": uid},
                          headers={"Authorization": f"Bearer {upload['uploadToken']}"}) as resp:
        assert resp.status == 411
        assert (await resp.json())["error"]["code"] == "length_required"
    assert h.sim.stats.parts_received == 0


async def test_tokens_api_keys_and_other_sessions(h: Harness) -> None:
    mine, theirs = (await h.session(4))["upload"], (await h.session(4))["upload"]
    uid = (await h.edge(mine, "POST", "start")).body["uploadId"]
    for token in ("unknown-token", ""):
        reply = await h.edge(mine, "POST", "start", token=token or " ")
        assert (reply.status, reply.body["error"]["code"]) == (401, "invalid_token")
    as_key = await h.edge(mine, "POST", "start", token=KEY)
    assert (as_key.status, as_key.body["error"]["code"]) == (401, "api_key_not_accepted")
    beside = await h.edge(mine, "PUT", "parts/1", data=b"0123", upload_id=uid,
                          headers={"X-Api-Key": KEY})
    assert beside.status == 401
    assert h.sim.stats.api_keys_at_upload_host == 2
    foreign = await h.edge(theirs, "PUT", "parts/1", data=b"0123", upload_id=uid)
    assert (foreign.status, foreign.body["error"]["code"]) == (403, "forbidden")
    assert h.sim.stats.parts_received == 0


async def test_routes_and_methods_answer_in_the_upload_hosts_shape(h: Harness) -> None:
    upload = (await h.session(4))["upload"]
    for method, action, status in (("GET", "start", 405), ("POST", "parts/1", 405),
                                   ("POST", "finish", 404), ("PUT", "parts", 404),
                                   ("POST", "start/more", 404)):
        reply = await h.edge(upload, method, action)
        assert reply.status == status, (method, action)
        assert set(reply.body["error"]) == {"code", "message"}
    assert h.sim.stats.status_count("edge:unknown", 404) == 1


async def test_sessions_expire_by_their_lifetime_even_a_lifetime_changed_live(
    h: Harness,
) -> None:
    created = await h.session(4)
    upload = created["upload"]
    uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
    await h.wall.advance_to(h.wall.now() + 3599)
    assert (await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)).status == 200
    await h.wall.advance_to(h.wall.now() + 1)
    late = await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
    assert (late.status, late.body["error"]["code"]) == (403, "upload_session_expired")
    fresh = (await h.session(4))["upload"]
    h.sim.update_config(upload_session_ttl=0)  # a fault: every session ends now
    assert (await h.edge(fresh, "POST", "start")).body["error"]["code"] == "upload_session_expired"
    assert h.sim.stats.upload_sessions_expired == 2
    missing = await h.call("complete_project_upload", {"apiProjectId": created["apiProjectId"]})
    assert missing.body["code"] == "UPLOAD_MISSING"


async def test_a_completed_upload_outlives_its_session(h: Harness) -> None:
    created = await h.session(4)
    await h.upload(created, b"0123")
    await h.wall.advance_to(h.wall.now() + 7200)
    done = await h.call("complete_project_upload", {"apiProjectId": created["apiProjectId"]})
    assert done.status == 200


async def test_once_confirmed_no_new_upload_replaces_the_file(h: Harness) -> None:
    created = await h.session(4)
    upload = created["upload"]
    started = (await h.edge(upload, "POST", "start")).body["uploadId"]
    uid = await h.upload(created, b"0123")
    await h.call("complete_project_upload", {"apiProjectId": created["apiProjectId"]})
    again = await h.edge(upload, "POST", "start")
    assert (again.status, again.body["error"]["code"]) == (409, "upload_confirmed")
    late = await h.edge(upload, "PUT", "parts/1", data=b"9999", upload_id=started)
    assert late.status == 409
    receipts = [{"partNumber": 1, "etag": etag_of(b"0123")}]
    repeat = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts})
    assert repeat.status == 200  # the answer a client lost, given again
    aborted = await h.edge(upload, "POST", "abort", body={"uploadId": uid})
    assert aborted.status == 409
    assert (await h.edge(upload, "POST", "abort", body={"uploadId": started})).status == 200
    assert (await h.edge(upload, "POST", "abort", body={"uploadId": started})).status == 200
    assert h.sim.stats.uploads_aborted == 1
    assert h.sim.state.projects[created["apiProjectId"]].audio == b"0123"


async def test_the_start_answer_can_override_the_part_size() -> None:
    async with serve(SimConfig(part_size=4, edge_part_size=3)) as h:
        created = await h.session(7)
        assert created["upload"]["partSizeBytes"] == 4
        started = await h.edge(created["upload"], "POST", "start")
        assert started.body["partSizeBytes"] == 3
        await h.upload(created, b"0123456")  # parts of 3, as the start said
        assert h.sim.stats.parts_received == 3


async def test_bytes_past_max_bytes_are_refused() -> None:
    async with serve(SimConfig(part_size=4, max_upload_bytes=6)) as h:
        upload = (await h.session(6))["upload"]
        uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
        await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
        past = await h.edge(upload, "PUT", "parts/2", data=b"456", upload_id=uid)
        assert (past.status, past.body["error"]["code"]) == (413, "upload_too_large")
        far = await h.edge(upload, "PUT", "parts/3", data=b"", upload_id=uid)
        assert far.status == 413


# -- part faults --------------------------------------------------------------


async def test_part_errors_store_nothing() -> None:
    async with serve(SimConfig(part_size=4, part_error_rate=1.0)) as h:
        upload = (await h.session(4))["upload"]
        uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
        failed = await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
        assert (failed.status, failed.body["error"]["code"]) == (500, "internal_error")
        assert (h.sim.stats.part_errors_injected, h.sim.stats.parts_received) == (1, 0)
        h.sim.update_config(part_error_rate=0)
        ok = await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
        assert ok.status == 200
        assert h.sim.stats.parts_resent == 0  # the failed attempt stored nothing


async def test_a_lost_part_answer_after_the_part_is_stored_then_a_resend() -> None:
    async with serve(SimConfig(part_size=4, part_lost_rate=1.0)) as h:
        created = await h.session(4)
        upload = created["upload"]
        uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
        with pytest.raises(aiohttp.ClientError):
            await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
        stats = h.sim.stats
        # aiohttp itself sends an idempotent PUT again when a kept-alive
        # connection drops, so the part may have been lost more than once.
        lost = stats.part_responses_lost
        assert lost >= 1 and stats.parts_received == lost
        assert stats.status_count("edge:parts", "lost") == lost
        h.sim.update_config(part_lost_rate=0)
        receipts = await h.put_parts(upload, uid, b"0123", 4)
        done = await h.edge(upload, "POST", "complete", body={"uploadId": uid, "parts": receipts})
        assert done.status == 200
        assert (h.sim.stats.parts_received, h.sim.stats.parts_resent) == (lost + 1, lost)


async def test_part_latency_delays_parts_only() -> None:
    async with serve(SimConfig(part_size=4, part_latency=(0.2, 0.2))) as h:
        upload = (await h.session(4))["upload"]
        began = time.monotonic()
        uid = (await h.edge(upload, "POST", "start")).body["uploadId"]
        assert time.monotonic() - began < 0.15
        began = time.monotonic()
        await h.edge(upload, "PUT", "parts/1", data=b"0123", upload_id=uid)
        assert time.monotonic() - began >= 0.2


# -- property over HTTP -------------------------------------------------------


async def _round_trip(data: bytes, part_size: int) -> None:
    async with serve(SimConfig(part_size=part_size)) as h:
        created = await h.session(len(data))
        await h.upload(created, data)
        done = await h.call("complete_project_upload", {"apiProjectId": created["apiProjectId"]})
        assert done.body["sizeBytes"] == len(data)
        assert h.sim.state.projects[created["apiProjectId"]].audio == data
        assert h.sim.stats.parts_received == len(split(data, part_size))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), part_size=st.integers(1, 128))
def test_any_file_through_http_is_stored_exactly(data: bytes, part_size: int) -> None:
    anyio.run(_round_trip, data, part_size, backend="asyncio")
