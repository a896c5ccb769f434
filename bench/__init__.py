"""Benchmarks: rate efficiency, CPU, polling, memory, ledger, SDK baseline.

Run ``python -m bench`` from the repository root (``--quick`` for a smoke run).
Figures, not tests: nothing here is asserted.
"""
