"""Bytes clients send that need decoding or fetching: images in chat messages (checks,
guarded fetch) and uploaded audio."""
