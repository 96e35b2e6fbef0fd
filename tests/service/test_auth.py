"""Tokens: missing, malformed, wrong and right tokens on every route; management off by default."""

from __future__ import annotations

import pytest

from tests.service.helpers import ADMIN, API, auth, error, served, wav_bytes

MISSING = error(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
INVALID = error(401, "unauthorized", "invalid bearer token")
FORBIDDEN = error(403, "forbidden", "this token may classify but not manage tasks")
DISABLED = error(403, "management_disabled",
                 "task management is disabled: set AAT_ADMIN_TOKEN to enable PUT and DELETE "
                 "/tasks/{task}")


@pytest.fixture(scope="module")
def upload(bundles):
    return bundles["words"].to_bytes()


def _routes(upload):
    """(name, method, path, body, headers, status when authorised)."""
    octet = {"content-type": "application/octet-stream"}
    return [
        ("classify", "POST", "/classify/birds", wav_bytes(), {"content-type": "audio/wav"}, 200),
        ("list", "GET", "/tasks", None, {}, 200),
        ("manifest", "GET", "/tasks/birds", None, {}, 200),
        ("put", "PUT", "/tasks/words", upload, octet, 201),
        ("delete", "DELETE", "/tasks/words", None, {}, 200),
    ]


def _call(client, method, path, body, headers, extra):
    return client.request(method, path, content=body, headers={**headers, **extra})


def test_every_route_with_both_tokens_set(make_app, store, bundles, upload):
    bundles["birds"].save(store / "birds.safetensors")
    with served(make_app(admin_token=ADMIN, api_token=API)) as c:
        for name, method, path, body, headers, ok in _routes(upload):
            admin_route = name in ("put", "delete")
            cases = [
                ({}, MISSING),
                ({"Authorization": "Basic dXNlcjpwYXNz"}, error(
                    401, "unauthorized",
                    "malformed Authorization header: expected 'Bearer <token>'")),
                ({"Authorization": "Bearer "}, error(
                    401, "unauthorized",
                    "malformed Authorization header: expected 'Bearer <token>'")),
                (auth("wrong-token-0123456789"), INVALID),
                (auth(API + "x"), INVALID),
                (auth(API[:-1]), INVALID),
            ]
            for extra, expected in cases:
                r = _call(c, method, path, body, headers, extra)
                assert (r.status_code, r.json()) == expected, (name, extra)
                assert r.headers["www-authenticate"].startswith("Bearer")
            r = _call(c, method, path, body, headers, auth(API))
            if admin_route:
                assert (r.status_code, r.json()) == FORBIDDEN, name
            else:
                assert r.status_code == ok, (name, r.text)
            r = _call(c, method, path, body, headers, auth(ADMIN))
            assert r.status_code == ok, (name, r.text)
        for open_route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert c.get(open_route).status_code == 200, open_route
        metrics = c.get("/metrics").text
        assert 'aat_rejections_total{reason="unauthorized"} 30.0' in metrics
        assert 'aat_rejections_total{reason="forbidden"} 2.0' in metrics


def test_auth_is_checked_before_anything_else(make_app):
    with served(make_app(admin_token=ADMIN, api_token=API)) as c:
        # an invalid name, an unknown task or an empty body must not leak past the token check
        for method, path in (("POST", "/classify/..%2Fx"), ("POST", "/classify/nope"),
                             ("GET", "/tasks/Bad"), ("PUT", "/tasks/%2e%2e"),
                             ("DELETE", "/tasks/nope")):
            r = c.request(method, path, content=b"")
            assert (r.status_code, r.json()) == MISSING, path


def test_without_an_api_token_classification_and_listing_are_open(make_app, store, bundles,
                                                                   upload):
    bundles["birds"].save(store / "birds.safetensors")
    with served(make_app(admin_token=ADMIN)) as c:
        for name, method, path, body, headers, ok in _routes(upload):
            r = _call(c, method, path, body, headers, {})
            if name in ("put", "delete"):
                assert (r.status_code, r.json()) == MISSING, name
            else:
                assert r.status_code == ok, name
        # the admin token also works where no token is needed
        r = c.get("/tasks", headers=auth(ADMIN))
        assert r.status_code == 200


def test_management_is_off_without_an_admin_token(make_app, store, bundles, upload):
    bundles["words"].save(store / "words.safetensors")
    with served(make_app(api_token=API)) as c:
        for extra in ({}, auth(API), auth(ADMIN), auth("anything-at-all-123456")):
            r = c.put("/tasks/words", content=upload,
                      headers={"content-type": "application/octet-stream", **extra})
            assert (r.status_code, r.json()) == DISABLED
            r = c.delete("/tasks/words", headers=extra)
            assert (r.status_code, r.json()) == DISABLED
        assert c.get("/tasks/words", headers=auth(API)).status_code == 200  # nothing changed
        assert sorted(p.name for p in store.iterdir()) == ["words.safetensors"]
