"""Asking a language model which objects in a scene could be sounding.

``prompt``: the versioned prompt template; ``backends``: local transformers model or an
OpenAI-compatible HTTP server; ``parse``: reading the object list out of the answer, and mapping
names onto a dataset vocabulary. The ``sources`` stage ties them together.
"""
