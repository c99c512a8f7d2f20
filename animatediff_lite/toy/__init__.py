"""Toy data outside the core: procedural clips (:mod:`.synthetic`) and checks of generated clips (:mod:`.metrics`).

They train and evaluate the embedded default model and feed the tests; the library itself never imports them.
"""
