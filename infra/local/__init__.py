"""A local multi-node cluster on this one machine: Ray head + worker nodes, S3 (SeaweedFS), MLflow.

    make cluster-up      # python -m infra.local up: prints the addresses and the exports
    make cluster-down    # python -m infra.local down: stops exactly what `up` started
"""
from infra.local.cluster import ClusterInfo, cluster_file, down, read_cluster, read_env, up

__all__ = ["ClusterInfo", "cluster_file", "down", "read_cluster", "read_env", "up"]
