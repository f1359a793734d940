"""Runtimes that carry the federation's secure sums: :mod:`.embedded` (every market in this
process, the default) and :mod:`.flower` (one process per market on Flower's Deployment Engine)."""

__all__: list[str] = []
