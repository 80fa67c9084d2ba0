"""A fleet reload across 30 worker nodes on this machine (solo pool, one tiny model each, started
together), while a stream of tasks that use the model runs throughout: every node answers the
reload, no task fails, and every task sent after the last reply is answered by the new version.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from harness import close_app, wait_for
from harness.fleet import VERSIONS, start_fleet, stop_fleet, tiny_manifest, wait_fleet
from shared.manifest import load_manifest
from shared.reload import collect_replies, send_request
from tests.reliability.tools import Tally, client_app, statuses, wait_final
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
NODES = 30
ROWS = [[0.1, 0.2, 0.3], [1.5, -0.5, 0.0]]


def test_a_fleet_reload_across_30_nodes_gets_every_reply_and_fails_no_task(
    private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    url, prefix = private_redis.url, "fleet"
    manifest = tiny_manifest(tmp_path / "models")
    client = redis.Redis.from_url(url)
    t0 = time.monotonic()
    nodes = start_fleet(url, NODES, prefix, manifest, tmp_path)
    app = client_app(url, prefix)
    sent: list[tuple[float, str]] = []
    stop = threading.Event()

    def stream() -> None:  # ~25 tasks a second, the whole time
        while not stop.is_set():
            task = app.send_task("clustering.assign", args=[ROWS], kwargs={"model": "seg"})
            sent.append((time.monotonic(), task.id))
            stop.wait(0.04)

    sender = threading.Thread(target=stream, daemon=True)
    try:
        wait_fleet(client, prefix, nodes, timeout=240)
        started_s = time.monotonic() - t0
        sender.start()
        wait_for(lambda: statuses(client, [i for _, i in sent])["SUCCESS"] >= 25, 60, "25 done")

        t_reload = time.monotonic()
        request = send_request(
            client, prefix, load_manifest(manifest), models=["seg"], version=VERSIONS[1]
        )
        outcome = collect_replies(client, prefix, request, timeout=60)
        replied = time.monotonic()
        time.sleep(2.0)  # the stream goes on after the reload
        stop.set()
        sender.join(10)

        ids = [i for _, i in sent]
        results = wait_final(client, ids, 120, "every task of the stream")
        after = [i for t, i in sent if t > replied]
        tally = Tally.count(
            f"fleet reload across {NODES} nodes under a stream",
            ids,
            results,
            nodes,
            t0,
            nodes_ready_s=round(started_s, 1),
            reload_to_last_reply_s=round(replied - t_reload, 2),
            replies=len(outcome.replies),
            sent_after_the_last_reply=len(after),
        )
        tally.report()

        assert len(request.expected) == NODES
        assert outcome.ok and not outcome.missing, outcome.missing
        assert sorted(r.node for r in outcome.replies) == sorted(n.node for n in nodes)
        assert all(r.ok and r.results[0].new_version == VERSIONS[1] for r in outcome.replies)
        assert tally.failed == 0 and tally.lost == 0 and tally.completed == len(ids)
        assert after and {results[i]["result"]["version"] for i in after} == {VERSIONS[1]}
        assert all(node.alive() for node in nodes)
    finally:
        stop.set()
        close_app(app)
        stop_fleet(nodes)
        client.close()
