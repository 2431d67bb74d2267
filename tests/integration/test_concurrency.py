"""One queue keeps many requests in flight on a slow LUN and completes them out of
order (virtio allows it): checked through the worker's own in-flight high-water
mark and the order of the used ring, not through timing."""
from __future__ import annotations

import pytest

from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import guest_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("aio", ["auto", "sync"])
def test_slow_lun_keeps_requests_in_flight(start_daemon, guest_factory, aio):  # noqa: F811
    d = start_daemon("--lun", f"null:64M,delay_us=50000,aio={aio}", "--lun", "null:64M")
    g = guest_factory(d)
    b, q = g.builders[2], g.queues[2]
    base = q.avail_idx                # (after the unit attentions were cleared)
    slow = [b.command(vs.read10(8 * i, 8), lun=0, data_in_len=4096, publish=False)
            for i in range(16)]
    fast = b.command(vs.read10(0, 8), lun=1, data_in_len=4096, publish=False)
    q.publish()
    q.kick()
    order = []
    while len(order) < 17:
        for h in b.reap():
            order.append(h)
        if len(order) < 17:
            assert q.wait_used(10)
    assert all(h.response.status == 0 for h in order)
    # The fast LUN's request, submitted last, completed first: out of order.
    assert order[0] is fast
    assert set(order[1:]) == set(slow)
    assert g.fe.get_vring_base(2) == base + 17
    stopped = d.ring_stopped()
    in_flight = max(stopped.get("max_inflight", 0), stopped.get("c_max_in_flight", 0))
    assert in_flight >= 16, stopped


def test_a_long_pass_publishes_its_completions_as_it_goes(start_daemon, guest_factory,  # noqa: F811
                                                         engine):
    # 32 requests in one kick: the C engine publishes the used index every 8 completions
    # (PUBLISH_EVERY in workers/_engine.c), so a driver that waits for an interrupt gets
    # the first ones while the rest are served, instead of all of them at the pass's end.
    if engine == "python":
        pytest.skip("the reference engine publishes once per pass")
    d = start_daemon("--lun", "null:64M")
    g = guest_factory(d)
    b, q = g.builders[2], g.queues[2]
    base = q.avail_idx
    hs = [b.command(vs.read10(8 * i, 8), data_in_len=4096, publish=False) for i in range(32)]
    q.publish()
    q.kick()
    done = []
    while len(done) < 32:
        done += b.reap()
        if len(done) < 32:
            assert q.wait_used(10)
    assert set(done) == set(hs) and all(h.response.status == 0 for h in hs)
    assert g.fe.get_vring_base(2) == base + 32
    stopped = d.ring_stopped()
    # Every earlier request (the unit attentions' clearing) was one pass, one publication.
    earlier = stopped["requests"] - 32
    assert stopped["c_batches"] - earlier == 32 // 8, stopped
