"""Exporters: one module per artifact format, each a stage (`transforms=False`) that writes files into
the output folder, reads them back in the format's own terms, and is measured by the same evaluator.
"""
