"""tl.engine: the machinery. Open it when a run must be exact, robust, fast or reported.

The core (tl/*.py) teaches transfer learning; this package makes a run of it
trustworthy: the run as named steps, its folder and records, resume, caches, image
hygiene, weights, evaluation and its reports, class balance, prediction, export and
pictures. It imports the core, never the other way round.
"""
