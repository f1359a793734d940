"""The distributed runtime on Flower (Deployment Engine): our secure sum carried as Flower messages.

Modules, from the wire up: :mod:`.wire` (frames and payloads), :mod:`.coordinator` (the
aggregator's side, transport-independent), :mod:`.worker` (a market's long-lived worker),
:mod:`.executor` (the worker running its SuperNode's ClientApp tasks in process), :mod:`.app`
(ServerApp and ClientApp), :mod:`.tuning` and :mod:`.supernode` (Flower's idle polls capped),
:mod:`.doorbell` (the SuperNode wakes its worker when a task waits),
:mod:`.workloads` (benchmark workloads), :mod:`.pki` (TLS files, throwaway loopback PKI),
:mod:`.processes` and :mod:`.local` (a whole deployment on loopback).

Flower launches the apps by module path (``fedmm_secure.runtime.flower.app:server_app``,
``python -m fedmm_secure.runtime.flower.worker``); this package imports nothing on its own, so a
ClientApp process that imports :mod:`.app` loads neither torch nor the federation code.
"""

__all__: list[str] = []
