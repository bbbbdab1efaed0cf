"""HTTP and WebSocket surface, one module per resource."""
