"""``/docs`` works with no internet: a real headless Chromium loads it from a real ``aat serve``
on 127.0.0.1, with every other host unresolvable, and finds the operations Swagger UI renders.

Skips without chromium unless ``AAT_REQUIRE_TOOLS=1``. Every wait is bounded; the server is
always stopped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from aat_serve.adapters.demo_assets import available
from tests.helpers import require_tool
from tests.server_process import Server

pytestmark = pytest.mark.skipif(not available(), reason="demo assets not built")

OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
"""Chromium host rules: every name but 127.0.0.1 fails to resolve (no CDN can answer)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs-serve")
    s = Server(tmp, "serve", cwd=tmp)
    try:
        s.wait_ready(120, path="/healthz")  # /docs needs no warm-up
        yield s.url
    finally:
        s.stop()


def _dump_dom(url: str, tmp_path: Path) -> str:
    chromium = require_tool("chromium")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           f"--host-resolver-rules={OFFLINE}", "--virtual-time-budget=20000",
           "--timeout=60000", "--dump-dom", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_docs_page_uses_only_local_assets(server):
    html = httpx.get(server + "/docs", timeout=10).text
    assert "/docs-assets/swagger-ui-bundle.js" in html and "/docs-assets/swagger-ui.css" in html
    assert "cdn.jsdelivr" not in html and "https://" not in html
    js = httpx.get(server + "/docs-assets/swagger-ui-bundle.js", timeout=10)
    assert js.status_code == 200 and len(js.content) > 100_000  # the real bundle
    redoc = httpx.get(server + "/redoc", timeout=10).text
    assert "/docs-assets/redoc.standalone.js" in redoc and "https://" not in redoc
    missing = httpx.get(server + "/docs-assets/nope.js", timeout=10)
    assert missing.status_code == 404


def test_swagger_ui_renders_the_operations_offline(server, tmp_path):
    dom = _dump_dom(server + "/docs", tmp_path)
    assert 'class="swagger-ui' in dom, dom[-2000:]
    for text in ("/classify/{task}", "/tasks/{task}", ">PUT<", ">DELETE<", ">POST<"):
        assert text in dom, text
    # differs: FastAPI's stock page (assets from the CDN) renders no operation offline
    from fastapi.openapi.docs import get_swagger_ui_html

    stock = tmp_path / "stock.html"
    stock.write_bytes(get_swagger_ui_html(openapi_url=server + "/openapi.json",
                                          title="stock").body)
    bare = _dump_dom(stock.as_uri(), tmp_path)
    assert "cdn.jsdelivr" in bare and "/classify/{task}" not in bare
    assert ">PUT<" not in bare
