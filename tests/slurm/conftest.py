"""The ``slurm_cluster`` fixture: a real two-node Slurm cluster for the session (see cluster.py)."""

import os
import shutil

import pytest

from tests.slurm.cluster import Cluster, missing_programs


@pytest.fixture(scope="session")
def slurm_cluster():
    """munged + slurmctld + slurmd n1/n2, started once (or reused if already up), stopped at the end.

    Skipped only when Slurm is not installed; any other problem starting it is an error.
    """
    if shutil.which("slurmctld") is None:
        pytest.skip("slurmctld is not installed: `apt-get install slurm-wlm munge` to run the Slurm cluster tests")
    missing = missing_programs()
    if missing:
        pytest.fail(f"slurmctld is installed but not {', '.join(missing)}: apt-get install slurm-wlm munge")
    cluster = Cluster().start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if cluster.started_here:
            cluster.stop()

