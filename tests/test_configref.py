"""The configuration reference is generated from the code that reads the config, and the
example files show every key it reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from collector.configref import agent_keys, collector_keys, leaf, render

REPO = Path(__file__).resolve().parent.parent


def test_config_reference_is_in_sync():
    assert (REPO / "docs" / "config.md").read_text() == render(), \
        "regenerate: python -m collector.configref > docs/config.md"


@pytest.mark.parametrize("name,keys", [("agent", agent_keys), ("collector", collector_keys)])
def test_every_key_is_shown_in_the_example_file(name, keys):
    text = (REPO / "config" / f"{name}.example.yaml").read_text()
    found = keys()
    secrets = {path for path, kind, _ in found if kind.startswith("secret")}
    missing = sorted({path for path, _, _ in found
                      if not (path.endswith("_file") and path[:-5] in secrets)
                      and not re.search(r"(^|[\s{,#])" + re.escape(leaf(path)) + r"(_file)?:", text, re.M)})
    assert not missing, f"config/{name}.example.yaml does not show: {missing}"


def test_reference_names_the_contract_keys():
    text = render()
    for key in ("`hub`", "`interval`", "`mqtt.url`", "`buffer.path`", "`buffer.max_mb`", "`mqtt.share_group`",
                "`influxdb.api`", "`influxdb.database`", "`outages.min_power_s`", "`alerts.rules.on_battery.debounce`"):
        assert key in text, key
