"""micro server: the daemon that serves every building block."""
