"""The demo tasks stay available beside a store of one's own (``--demo`` / ``AAT_DEMO``).

With the demo backbone the demo's tasks are a read-only layer beneath the store: a store of
one own task serves that task and ``digits``, ``commands``, ``instruments``; a store task of a
demo task's name wins over it; a demo task cannot be deleted. Another backbone serves only the
store's own tasks, and ``--demo`` with it is refused at start-up.
"""

from __future__ import annotations

import pytest

from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.demo_assets import TASKS_DIR, available
from aat_serve.adapters.errors import ConfigError
from aat_serve.service.app import create_app
from aat_serve.service.runtime import with_embedded_defaults
from aat_serve.service.settings import Settings
from tests.service.helpers import ADMIN, auth, load_tiny, make_bundle, served, wav_bytes

pytestmark = pytest.mark.skipif(not available(), reason="demo assets not built")

DEMO_TASKS = {"commands", "digits", "instruments"}
WAV = {"Content-Type": "audio/wav"}


@pytest.fixture(scope="module")
def demo_ckpt():
    return load_checkpoint("demo")


def _store(tmp_path, ckpt, *names):
    store = tmp_path / "store"
    store.mkdir()
    for i, name in enumerate(names):
        make_bundle(ckpt, name, seed=i, labels=["a", "b", "c", "d"]).save(
            store / f"{name}.safetensors")
    return store


def _tasks(client) -> dict[str, dict]:
    body = client.get("/tasks").json()
    return {t["task"]: t for t in body["tasks"]}


def test_demo_backbone_serves_the_demo_tasks_beside_the_own_one(tmp_path, demo_ckpt):
    store = _store(tmp_path, demo_ckpt, "mine")
    settings = with_embedded_defaults(Settings(bundle_dir=store))  # no checkpoint: the demo's
    assert settings.demo is True
    with served(create_app(settings, checkpoint=demo_ckpt)) as client:
        assert set(_tasks(client)) == DEMO_TASKS | {"mine"}
        for task in ("digits", "mine"):
            r = client.post(f"/classify/{task}", content=wav_bytes(0.5), headers=WAV)
            assert r.status_code == 200, r.text
    assert sorted(p.name for p in store.iterdir()) == ["mine.safetensors"]  # nothing copied


def test_no_demo_serves_only_the_own_task(tmp_path, demo_ckpt):
    store = _store(tmp_path, demo_ckpt, "mine")
    settings = with_embedded_defaults(Settings(bundle_dir=store, demo=False))
    with served(create_app(settings, checkpoint=demo_ckpt)) as client:
        assert set(_tasks(client)) == {"mine"}
        r = client.post("/classify/digits", content=wav_bytes(0.5), headers=WAV)
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_task"


def test_another_backbone_serves_only_the_own_task(tmp_path):
    ckpt_dir = tmp_path / "tiny"
    from tests.service.helpers import write_tiny_checkpoint

    write_tiny_checkpoint(ckpt_dir)
    tiny = load_tiny(ckpt_dir)
    store = _store(tmp_path, tiny, "mine")
    settings = with_embedded_defaults(Settings(checkpoint=ckpt_dir, bundle_dir=store))
    assert settings.demo is False
    with served(create_app(settings, checkpoint=tiny)) as client:
        assert set(_tasks(client)) == {"mine"}
    with pytest.raises(ConfigError, match="need the demo backbone"):
        with_embedded_defaults(Settings(checkpoint=ckpt_dir, bundle_dir=store, demo=True))


def test_a_store_task_of_a_demo_name_wins_and_demo_tasks_are_read_only(tmp_path, demo_ckpt):
    store = _store(tmp_path, demo_ckpt, "digits")
    settings = with_embedded_defaults(Settings(bundle_dir=store, admin_token=ADMIN))
    with served(create_app(settings, checkpoint=demo_ckpt)) as client:
        tasks = _tasks(client)
        assert set(tasks) == DEMO_TASKS
        assert tasks["digits"]["labels"] == ["a", "b", "c", "d"]  # the store's, not the demo's
        r = client.delete("/tasks/commands", headers=auth(ADMIN))
        assert r.status_code == 403
        assert r.json() == {"error": {"type": "forbidden", "message": (
            "task 'commands' is a read-only demo task (AAT_DEMO); upload a bundle of that "
            "name to replace it, or serve without the demo tasks (--no-demo)")}}
        assert (TASKS_DIR / "commands.safetensors").is_file()
        assert client.delete("/tasks/digits", headers=auth(ADMIN)).status_code == 200
        assert not (store / "digits.safetensors").exists()
