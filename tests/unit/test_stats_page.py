"""The workers' statistics page: the C histogram buckets, what a worker writes and the
supervisor reads from the layout the worker describes (one definition: _engine.h),
percentiles, and the Prometheus export of the histograms."""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vscsid.supervisor.metrics import EXPORT_BOUNDS_US, _cumulative
from vscsid.supervisor.statspage import StatsReader, merge, percentile
from vscsid.workers._fast import ffi, lib
from vscsid.workers.stats import StatsPage, layout

N = lib.VSD_HIST_BUCKETS


def test_bucket_bounds_are_log_linear_and_contiguous():
    lower = [lib.vsd_hist_lower_us(i) for i in range(N)]
    assert lower[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert lower[9:13] == [10, 12, 14, 16]
    assert all(a < b for a, b in zip(lower, lower[1:]))
    for i in range(1, N - 1):           # four buckets per power of two
        if lower[i] >= 4 and lower[i] & (lower[i] - 1) == 0:
            assert lower[i + 4] == 2 * lower[i] if i + 4 < N else True
    assert lower[-1] > 16_000_000       # the last bounded bucket starts beyond 16 s


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 1 << 40))
def test_every_latency_falls_in_its_bucket(ns):
    i = lib.vsd_hist_bucket(ns)
    us = ns // 1000
    assert 0 <= i < N
    assert lib.vsd_hist_lower_us(i) <= us
    if i < N - 1:
        assert us < lib.vsd_hist_lower_us(i + 1)


def test_what_a_worker_counts_the_supervisor_reads():
    fd = os.memfd_create("stats-test")
    page = StatsPage(os.dup(fd))              # the worker (takes its fd over)
    page.count(3, 0, 4096, 0, None, False, 25_000)          # a 25 µs read
    page.count(3, 1, 0, 8192, None, False, 900_000)         # a 900 µs write
    page.count(3, 2, 0, 0, 6, False, None)                  # a UNIT ATTENTION, not timed
    page.count(3, 2, 0, 0, None, True, None)                # a transport failure
    page.st.q.fast += 5
    page.lun(3).in_flight = 2
    r = StatsReader(fd, layout())               # the supervisor
    try:
        q = r.queue()
        assert q["fast"] == 5 and q["bytes_in"] == 4096 and q["bytes_out"] == 8192
        ls = r.lun(3)
        assert ls["ops"] == [1, 1, 2] and ls["bytes_in"] == 4096 and ls["bytes_out"] == 8192
        assert ls["errors"][6] == 1 and sum(ls["errors"]) == 1 and ls["failures"] == 1
        assert ls["in_flight"] == 2
        assert ls["lat_count"] == [1, 1, 0] and ls["lat_sum_ns"] == [25_000, 900_000, 0]
        assert ls["lat"][0][lib.vsd_hist_bucket(25_000)] == 1 and sum(ls["lat"][0]) == 1
        assert r.lun(4)["ops"] == [0, 0, 0]
        # A replacement worker maps the same page: counters go on, gauges restart.
        page.close()
        page2 = StatsPage(os.dup(fd))
        assert r.lun(3)["ops"] == [1, 1, 2] and r.lun(3)["in_flight"] == 0
        page2.clear_slot(3)                     # a new LUN in the slot starts at zero
        assert r.lun(3)["ops"] == [0, 0, 0] and r.queue()["fast"] == 5
        page2.close()
    finally:
        r.close()
        os.close(fd)


def test_the_layout_describes_the_c_struct():
    lay = layout()
    assert lay["size"] == ffi.sizeof("struct vsd_stats")
    names = [f[0] for f in lay["lun"]]
    assert names[:3] == ["ops", "bytes_in", "bytes_out"]
    assert dict((f[0], f[2]) for f in lay["lun"])["lat"] == [3, N]
    assert lay["lun_stride"] == ffi.sizeof("struct vsd_lunstats")
    assert len(lay["hist_lower_us"]) == N


def test_percentiles_and_merging():
    bounds = [lib.vsd_hist_lower_us(i) for i in range(N)]
    hist = [0] * N
    hist[lib.vsd_hist_bucket(10_000)] = 90        # 90 requests at ~10 µs
    hist[lib.vsd_hist_bucket(1_000_000)] = 10     # 10 at ~1 ms
    assert percentile(hist, bounds, 0.5) == 12     # the upper bound of 10's bucket
    assert 1000 < percentile(hist, bounds, 0.99) <= 1280
    assert percentile([0] * N, bounds, 0.5) is None
    a = {"ops": [1, 2, 3], "lat": [[1, 0], [0, 1]], "n": 4}
    b = {"ops": [1, 1, 1], "lat": [[0, 2], [1, 1]], "n": 1}
    m = merge(None, a)
    merge(m, b)
    assert m == {"ops": [2, 3, 4], "lat": [[1, 2], [1, 2]], "n": 5} and a["ops"] == [1, 2, 3]


def test_prometheus_buckets_are_cumulative_powers_of_two():
    bounds = [lib.vsd_hist_lower_us(i) for i in range(N)]
    hist = [0] * N
    for us, n in ((0, 1), (1, 2), (3, 3), (5, 4), (1000, 5), (20_000_000, 6)):
        hist[lib.vsd_hist_bucket(us * 1000)] += n
    out = _cumulative(hist, bounds)
    assert out[-1] == ("+Inf", 21.0)
    les = [float(le) for le, _ in out[:-1]]
    assert les == [b / 1e6 for b in EXPORT_BOUNDS_US]
    d = dict(out)
    assert d["1e-06"] == 1 and d["2e-06"] == 3 and d["4e-06"] == 6 and d["8e-06"] == 10
    assert d[repr(1024 / 1e6)] == 15 and d[repr(EXPORT_BOUNDS_US[-1] / 1e6)] == 15
    counts = [v for _, v in out]
    assert counts == sorted(counts)
