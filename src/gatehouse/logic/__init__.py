"""Business logic in Python: functions in a project's ``logic/`` package, served as ``/rpc/<name>``."""
