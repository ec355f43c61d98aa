"""The relay: the daemon's HTTP/2 front that routes each gRPC call to a node by copying its frames."""
