"""The virtio-scsi device personality on the supervisor's side (apart from the
generic vhost-user code, as rust-vmm splits vhost-device-scsi from
vhost-user-backend): the features and config space (config), the control queue
(controlq: task management, asynchronous notification) and the event queue
(eventq)."""
