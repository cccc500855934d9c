"""Streaming replay evaluation of liftrec against strong baselines (``liftrec evaluate``).

See ``docs/evaluation.md`` for the protocol, the baselines and their grids,
and the report. Modules:

* :mod:`.protocol` — windows, groups, targets, the leak-free history, replay steps;
* :mod:`.methods` — the method interface, popularity fallback, dense top-k;
* :mod:`.baselines` — popularity, repeat, static ALS, item-kNN, SKNN, rules;
* :mod:`.variants` — liftrec's ALS + fold-in and its blended candidate sources;
* :mod:`.pipeline_variant` — the full pipeline through ``serving``'s recommender;
* :mod:`.replay` — drives one method through one window;
* :mod:`.scoring` — HR / MRR / NDCG from ranks, paired bootstrap over users;
* :mod:`.tuning` — validation grids that widen at their edges;
* :mod:`.specs` — the evaluated methods and their grids;
* :mod:`.run` — one evaluation run; :mod:`.report` — metrics.json, Markdown, plots.
"""
