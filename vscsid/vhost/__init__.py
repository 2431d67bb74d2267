"""Device-agnostic vhost-user: the wire codec (protocol), the device state a front
end negotiates (device), the socket transport, the sans-IO request handler, and the
interface the servers of individual rings implement (rings)."""
