"""Finding this node's running husk pods (for `husk monitor` and `husk exec`).

A running pod's shim serves ``<state_dir>/sb/<sandbox id>/manage.sock``.
"""
from __future__ import annotations

from pathlib import Path

from shim import errors
from shim.ids import SANDBOXES_DIR, is_valid_id
from shim.sandbox import manage

INFO_TIMEOUT_S = 5.0
# A sandbox id prefix must be this long to name a pod (crictl's convention is similar).
MIN_PREFIX = 4


class PodNotFound(errors.NotFoundError):
    pass


def find_pods(state_dir: Path) -> list[Path]:
    """Run directories of the pods whose shim serves a management socket."""
    root = state_dir / SANDBOXES_DIR
    try:
        return sorted(d for d in root.iterdir() if (d / manage.MANAGE_SOCKET).exists())
    except OSError:
        return []


def resolve_pod(state_dir: Path, name: str) -> Path:
    """The run directory of the pod named by sandbox id, a unique id prefix, or its
    Kubernetes name (``name`` or ``namespace/name``).

    :raise PodNotFound: no pod, or more than one, answers to ``name``.
    """
    pods = find_pods(state_dir)
    if is_valid_id(name):
        exact = [p for p in pods if p.name == name]
        if exact:
            return exact[0]
        if len(name) >= MIN_PREFIX:
            prefixed = [p for p in pods if p.name.startswith(name)]
            if len(prefixed) == 1:
                return prefixed[0]
            if len(prefixed) > 1:
                raise PodNotFound(f"{len(prefixed)} pods have a sandbox id starting with {name!r}")
    namespace, _, pod_name = name.rpartition("/")
    named = []
    for run_dir in pods:
        try:
            pod = manage.call(run_dir, {"op": "info"}, timeout_s=INFO_TIMEOUT_S).get("pod") or {}
        except errors.HuskError:
            continue  # gone meanwhile, or not answering: not the one to exec in
        if pod.get("name") == pod_name and namespace in ("", pod.get("namespace")):
            named.append(run_dir)
    if len(named) == 1:
        return named[0]
    if named:
        raise PodNotFound(f"{len(named)} pods are named {pod_name!r}: give the namespace "
                          "(NAMESPACE/NAME) or the sandbox id")
    raise PodNotFound(f"no running husk pod is {name!r} (looked in {state_dir / SANDBOXES_DIR}: "
                      f"{len(pods)} pods)")
