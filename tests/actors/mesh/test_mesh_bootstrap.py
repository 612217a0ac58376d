"""The bootstrap file: format, typed errors naming the field, size cap, keys and anchors."""

from __future__ import annotations

import base64
import json

import pytest

from symbiote.actors.mesh.bootstrap import (
    MAX_BOOTSTRAP_BYTES,
    load_bootstrap,
    parse_bootstrap,
)
from symbiote.actors.mesh.identity import KeyRing, NodeIdentity
from symbiote.schema.mesh import BootstrapError


def good_doc() -> dict:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    return {
        "version": 1,
        "mesh": "egregora",
        "peers": [
            {
                "peer_id": a.peer_id,
                "addrs": ["10.0.0.1:7946", "[::1]:7946"],
                "public_key": base64.b64encode(a.genesis_key).decode(),
                "pretrusted": True,
                "name": "alpha",
            },
            {"peer_id": b.peer_id, "addrs": ["b.example.org:7946"]},
        ],
    }


def test_valid_file_gives_seeds_anchors_and_keys(tmp_path):
    doc = good_doc()
    path = tmp_path / "egregora-peers.json"
    path.write_text(json.dumps(doc))
    boot = load_bootstrap(path, mesh="egregora")
    assert boot.seeds == ["10.0.0.1:7946", "[::1]:7946", "b.example.org:7946"]
    assert boot.pretrusted == {doc["peers"][0]["peer_id"]}
    ring = KeyRing()
    assert boot.add_keys(ring) == 1  # only the peer that listed its key
    assert ring.get(doc["peers"][0]["peer_id"]).peer_id == doc["peers"][0]["peer_id"]


def _mutated(path: str, value) -> bytes:
    doc = good_doc()
    target = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("mutation", "value", "field"),
    [
        ("version", 2, "version"),
        ("mesh", KeyError, "file"),
        ("peers", [], "peers"),
        ("peers.0.peer_id", "NOT-A-PEER-ID", "peers[0].peer_id"),
        ("peers.1.addrs", [], "peers[1].addrs"),
        ("peers.1.addrs", ["no-port"], "peers[1].addrs[0]"),
        ("peers.1.addrs", [7946], "peers[1].addrs[0]"),
        ("peers.0.public_key", base64.b64encode(b"\x01" * 32).decode(), "peers[0].public_key"),
        ("peers.0.public_key", base64.b64encode(b"short").decode(), "peers[0].public_key"),
        ("peers.0.public_key", "%%% not base64", "peers[0].public_key"),
        ("peers.0.pretrusted", "yes", "peers[0].pretrusted"),
        ("peers.0.extra", 1, "peers[0]"),
    ],
)
def test_invalid_files_name_the_field(mutation, value, field):
    with pytest.raises(BootstrapError) as err:
        parse_bootstrap(_mutated(mutation, value))
    assert err.value.field == field, err.value


def test_duplicates_wrong_mesh_garbage_and_oversize_are_refused(tmp_path):
    doc = good_doc()
    doc["peers"].append(dict(doc["peers"][0]))
    with pytest.raises(BootstrapError) as err:
        parse_bootstrap(json.dumps(doc).encode())
    assert err.value.field == "peers[2].peer_id"
    with pytest.raises(BootstrapError) as err:
        parse_bootstrap(json.dumps(good_doc()).encode(), mesh="another-mesh")
    assert err.value.field == "mesh"
    with pytest.raises(BootstrapError) as err:
        parse_bootstrap(b"{not json")
    assert err.value.field == "file"
    with pytest.raises(BootstrapError) as err:
        parse_bootstrap(b" " * (MAX_BOOTSTRAP_BYTES + 1))
    assert err.value.field == "file"
    with pytest.raises(BootstrapError) as err:
        load_bootstrap(tmp_path / "missing.json")
    assert err.value.field == "file"
