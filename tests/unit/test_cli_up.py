"""`hean up` preparation that needs no processes: install check and the process plan."""

from __future__ import annotations

import pytest
from rich.console import Console

from hean.cli.up import SERVICES, ServiceSpec, Supervisor, UpError, UpOptions


def test_up_missing_service_fails_naming_it():
    sup = Supervisor(UpOptions(), Console())
    specs = (*SERVICES, ServiceSpec("warp-drive", "hean.warp_drive_not_installed"))
    with pytest.raises(
        UpError, match=r"not installed: warp-drive \(hean.warp_drive_not_installed\)"
    ):
        sup.check_installed(specs)


def test_up_all_eight_services_installed():
    Supervisor(UpOptions(), Console()).check_installed()
    assert len(SERVICES) == 8


def test_up_plan_gives_each_replica_its_own_health_port():
    plan = Supervisor(UpOptions(ml_replicas=3, health_port_base=9000), Console()).plan()
    labels = [label for _, label, _ in plan]
    assert labels.count("ml-service-1") == 1 and "ml-service-3" in labels
    assert labels[-1] == "market-data"  # producers start last
    ports = [port for _, _, port in plan]
    assert len(set(ports)) == len(ports) == 10
