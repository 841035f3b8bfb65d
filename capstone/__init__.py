"""The runtime of a collection's DAG: what workers and the triggerer import.

``settings`` (typed settings) and ``contracts`` (typed task results) are what the DAG factory
hands over; ``pipeline`` and ``validation`` are the task bodies; ``triggers`` and ``sensors``
build the index in the triggerer; ``search`` and ``registry`` serve queries. ``capstone`` never
imports ``dag_factory``, and no runtime module imports ``capstone.local`` (local tooling; only
the interactive ``capstone`` command line does, lazily, for ``db`` and the search fallback).
"""
