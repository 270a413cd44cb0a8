"""Tiny helper for authors: build a notebook from a list of ('md'|'code', source) cells.

Usage from Python: `from scripts.mknb import write_nb; write_nb(path, cells)`.
Authors may equally edit notebooks in Jupyter; this exists so notebooks can be written
from plain text too.
"""
import nbformat, sys
from pathlib import Path

def write_nb(path, cells):
    "Write `cells` ([(kind, source)], kind 'md' or 'code') as a notebook at `path`."
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    for kind, src in cells:
        src = src.strip("\n")
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    nbformat.write(nb, str(path))
