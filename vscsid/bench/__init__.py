"""``vscsid-bench`` and the driver side it is built on (the guest's half of virtio).

* :mod:`vscsid.bench.guestmem` -- memfd-backed guest memory + allocators
* :mod:`vscsid.bench.driverq` -- the guest's half of a split virtqueue
* :mod:`vscsid.bench.virtio_scsi` -- virtio-scsi request/response framing and CDB helpers
* :mod:`vscsid.bench.frontend` -- a vhost-user front end (QEMU's part)

The daemon never imports this package; it imports only the shared virtio layer
(:mod:`vscsid.virtio`) and the vhost-user codec (:mod:`vscsid.vhost.protocol`).
"""
