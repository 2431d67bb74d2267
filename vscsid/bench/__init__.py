"""``vscsid-bench``: a vhost-user storage load generator that needs no VM, and the
driver side (the guest's half of virtio) it is built on.

It plays QEMU and the guest driver at once: memfd guest memory, the vhost-user
control path and, per request queue, a driver-side split ring driven by a loop
in C. It drives any vhost-user storage back end: vscsid (``--format scsi``,
virtio-scsi) or e.g. ``qemu-storage-daemon --export type=vhost-user-blk``
(``--format blk``).

Modules
-------
* :mod:`~vscsid.bench.guestmem` -- memfd-backed guest memory + allocators
* :mod:`~vscsid.bench.driverq` -- the guest's half of a split virtqueue
* :mod:`~vscsid.bench.virtio_scsi` -- virtio-scsi requests, responses, CDBs, a request builder
* :mod:`~vscsid.bench.frontend` -- a vhost-user front end (QEMU's part)
* ``loop.c`` / ``loop.h`` -> :mod:`vscsid.bench._loop` -- the C driver loop, the loopback device
* :mod:`~vscsid.bench.loops` -- the per-queue loops: C (``bq_run``) and the Python reference
* :mod:`~vscsid.bench.runner` -- one run: setup, threads, CPU samples, results
* :mod:`~vscsid.bench.config`, :mod:`~vscsid.bench.cli` -- options, summary, ``--json``
* :mod:`~vscsid.bench.pattern`, :mod:`~vscsid.bench.stats` -- the verify pattern, the
  latency histogram, CPU accounting

Ring flags, sizes, fences and ``need_event`` are the shared virtio layer's
(:mod:`vscsid.virtio`: virtio.h, fences.h, defs.py), the virtio-scsi structures
:mod:`vscsid.virtio.scsi_wire`'s. The daemon never imports this package; this
package imports only :mod:`vscsid.virtio` and :mod:`vscsid.vhost.protocol`.

Design
------
* One OS thread per request queue. Each thread makes a single cffi call,
  ``bq_run``, which runs the whole submit/kick/wait/reap loop for its queue
  and returns when the window is over and the ring is drained. API-mode cffi
  releases the GIL for the call, so the threads run in parallel and no Python
  runs per I/O. Threads (rather than processes) keep one guest memory, one
  vhost-user connection and one ``getrusage`` scope; the C loop touches no
  Python object so there is nothing for the GIL to serialise.
* Every slot (one per unit of ``--iodepth``) owns its request header, response
  and data buffer in guest memory and a fixed descriptor chain (3 ring
  descriptors, or one indirect descriptor + a 3-entry table). Per I/O only the
  CDB / virtio-blk sector, and the descriptor flags when the direction
  changes, are rewritten.
* EVENT_IDX on both sides: kicks only when ``vring_need_event(avail_event)``
  says so; ``used_event`` is kept behind ``last_used`` while busy and set to
  ``last_used`` just before sleeping in ``poll()`` on the call eventfd.
* Latency: ``CLOCK_MONOTONIC`` at submission and at reaping, into a
  log-linear histogram (64 sub-buckets per power of two, <= 1.6 % error).
* ``--engine python`` runs the same loop in pure Python on the driver queue
  (slow; a reference to cross-check the C loop, in particular its verification).
* ``--verify`` writes a pattern with a header per 512-byte sector (magic,
  sector, seed, generation) and checks every read; after the timed phase every
  block written is read back and checked. Each queue owns a disjoint slice of
  the blocks and never has two I/Os on one block in flight, so the expected
  generation of every block is known exactly.
* ``--loopback`` replaces the back end by a C device thread in this process
  that completes requests at once: it measures the generator's own ceiling.
"""
