"""The worker pipeline: consume, fetch, decode, batch, embed, write segments, ack."""
