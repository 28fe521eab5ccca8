"""Sagas: multi-step workflows across databases and services that finish or undo themselves, through crashes.

Modules, imports pointing down the list: ``declare`` (the decorators and what a project declares), ``tables``
(apply's DDL and grants), ``store`` (the saga tables' SQL), ``faults`` (transient or final), ``steps`` (running
and recording one step), ``replay`` (the saga handle and replay), ``execute`` (one run's state machine),
``engine`` (start/get/retry/cancel and the lease-based runner). See docs/sagas.md.

This package's ``__init__`` imports nothing: ``gatehouse.project`` imports ``declare`` while the rest imports
the project.
"""
