"""depthq's core: what the watcher's host and the workers share, and what an operator runs.

- `config`, `contract`, `files`, `connection`, `logs`, `metrics`: the settings, the job payload and
  output names both sides agree on, atomic writes, the Redis connection. These import neither
  `producer` nor `worker`.
- `cli` (the `depthq` command), `supervisor` and `redis_server` (`depthq up`), `model_commands`
  (`depthq models`), and `ops/` (status, failed, dashboard, gallery). The CLI and the supervisor reach
  into `producer` or `worker` lazily, for the command that needs them, so `depthq watch` never imports
  numpy, torch or coremltools.
"""
