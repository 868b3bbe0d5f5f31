"""Retrieval of in-context examples (image RAG) and their encodings.

Modules: examples (check an (image, mask) pair; overlay and separate-mask encodings), embed (vision-tower
embeddings, content hashes), library (annotated images of a data folder), index (the faiss-backed index
folder: build, add, search, query), commands (`medplib index`). Import from the submodules: this package
imports nothing heavy (faiss, torch) by itself.
"""
