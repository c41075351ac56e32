"""The one way the commands start Ray: join a cluster as asked, else start a private local Ray
whose every process listens on 127.0.0.1 only.

:func:`init_local_ray` joins the cluster that ``RAY_ADDRESS`` (or ``address=``) names with
``ray.init`` as it is (the options that only size a new local Ray, such as ``num_cpus``, are
dropped); otherwise it starts a local Ray bound to loopback.

Why ``ray.init(_node_ip_address="127.0.0.1")`` is not enough (Ray 2.60): ``ray.init`` turns a
loopback ``_node_ip_address`` (and ``127.0.0.1`` in ``RAY_ADDRESS``) into the machine's routable
address (``services.resolve_ip_for_localhost`` → ``get_node_ip_address``), so the node's IP was
e.g. 192.0.2.2, and every server keys its bind address on that IP: the GCS, raylet and
core-worker gRPC servers listen on ``127.0.0.1`` only when the node IP is ``127.0.0.1`` (else
``0.0.0.0``/``::``, all interfaces), the dashboard agent's HTTP server and metrics exporter, and
the runtime-env agent, bind loopback only when the node IP is a loopback one (else all interfaces
or the node IP). Ray keeps the loopback IP only in its single-node mode (what it uses on macOS and
Windows): ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` false, read at import from
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. :func:`use_loopback` turns that mode on for this process
(the constant too, when Ray is already imported) and for its children: a job run as a subprocess
with ``RAY_ADDRESS=127.0.0.1:PORT`` needs it as well, or its ``ray.init`` rewrites that address
to the routable IP, which nothing listens on, and hangs. The dashboard (``include_dashboard``)
binds ``dashboard_host``, 127.0.0.1 unless a caller says otherwise. The one thing that mode
forbids is adding nodes (``ray start --address`` aborts): a multi-node cluster is started
without it (``cluster/local_two_node.py`` drops the variable from its nodes' environment).

Ray Serve's replicas add one server that no node setting reaches: the inter-deployment gRPC
server, bound to ``[::]:0`` in ``ray.serve._private.replica`` itself. ``init_local_ray(serve=True)``
(``cappy serve``, the serve benchmark) gives the Ray a ``worker_process_setup_hook``,
:func:`serve_grpc_on_loopback`, that binds it to 127.0.0.1 instead. A Ray one joins is left as it
is, Serve included. tests/jobs/test_local_ray.py checks every listening socket of such a Ray.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

LOOPBACK = "127.0.0.1"
#: Ray's single-node mode (``ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR``): "0" keeps the node on loopback.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: ``ray.init`` options that only configure a new local Ray; Ray refuses most of them when joining.
LOCAL_ONLY = frozenset({"num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "include_dashboard",
                        "dashboard_host", "dashboard_port", "_node_ip_address", "_system_config", "_temp_dir",
                        "_metrics_export_port"})

logger = logging.getLogger(__name__)


def joins_cluster(address: str | None = None) -> bool:
    """Whether ``ray.init(address=address)`` joins an existing cluster (``address`` or
    ``RAY_ADDRESS``; ``"local"`` always starts a new one)."""
    if address == "local":
        return False
    return bool(address or os.environ.get("RAY_ADDRESS"))


def use_loopback() -> None:
    """Ray's single-node mode for this process and its children: a Ray started next keeps the
    node IP 127.0.0.1, and ``RAY_ADDRESS=127.0.0.1:PORT`` stays on loopback (module docstring)."""
    os.environ[SINGLE_NODE_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # read from the environment when Ray was imported: too late for that
        constants.ENABLE_RAY_CLUSTER = False


def serve_grpc_on_loopback() -> None:
    """``worker_process_setup_hook`` of a local Ray that runs Serve: a Serve replica's
    inter-deployment gRPC server binds ``127.0.0.1:0`` instead of the ``[::]:0`` (every interface)
    that ``ray.serve._private.replica`` hard-codes with no option to change it."""
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback", False):  # another Ray version, or done already
        return

    def loopback(server, address):
        return bind(server, f"{LOOPBACK}:0" if address == "[::]:0" else address)

    loopback.loopback = True
    replica.add_port_to_grpc_server = loopback


def init_local_ray(serve: bool = False, **kwargs):
    """``ray.init(**kwargs)``: join ``RAY_ADDRESS`` / ``address=`` as it is (options in
    :data:`LOCAL_ONLY` dropped), else start a local Ray on 127.0.0.1 only; Ray's context.
    ``serve``: it will run Ray Serve, whose replicas' gRPC servers get :func:`serve_grpc_on_loopback`."""
    import ray

    if joins_cluster(kwargs.get("address")):
        return ray.init(**{k: v for k, v in kwargs.items() if k not in LOCAL_ONLY})
    use_loopback()
    if serve:
        kwargs["runtime_env"] = {**(kwargs.get("runtime_env") or {}),
                                 "worker_process_setup_hook": f"{__name__}.serve_grpc_on_loopback"}
    ctx = ray.init(**kwargs)
    ip = (getattr(ctx, "address_info", None) or {}).get("node_ip_address")
    if ip and not ipaddress.ip_address(ip).is_loopback:  # a Ray whose single-node mode changed
        logger.warning("the local Ray's node IP is %s, not loopback: its servers may listen beyond this machine", ip)
    return ctx
