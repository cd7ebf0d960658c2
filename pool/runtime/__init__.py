"""pool's runtime: the supervisor, its workers, the control socket, health and the wire format."""
