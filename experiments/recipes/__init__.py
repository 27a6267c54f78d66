"""The recipes: one short file per variant taught in the source documents.

A recipe file answers one question, names the document and section it reproduces, and
holds a `RECIPE` (the document's numbers) and a `build(model, spec, recipe)` that decides
what trains. Nothing else lives here: the registry that finds a recipe by name
(`NAMES`, `get_experiment`, the `tuned_<recipe>` variants) is `experiments/__init__.py`,
and the studies that compare recipes are the other modules of `experiments/`.
"""
