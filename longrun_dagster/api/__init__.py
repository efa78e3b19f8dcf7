"""Stages that call a model behind an OpenAI-compatible API (``api_stage``): a window of
requests in flight, retries by policy, a shared rate limit, answers kept as they arrive,
malformed answers quarantined, tokens and cost counted."""
