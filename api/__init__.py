"""The FastAPI front door. Never imports torch or transformers."""
