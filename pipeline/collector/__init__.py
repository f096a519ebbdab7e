"""The collector: read result records, aggregate them into scaling tables and a model, write the report.

Runs wherever the records are (a login node, a laptop), so nothing in this package imports torch.
"""
