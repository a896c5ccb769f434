"""batcher: run bulk jobs against the Diffio audio-restoration API."""

__all__: list[str] = []
