"""Talking to the endpoint: connections, the client, streams, the rate limiter, retry and the breaker."""
