"""Front-end processes: HTTP, tokens, bodies and decoding, beside one model process."""
