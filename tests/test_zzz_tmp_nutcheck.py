from tests.conftest import EMITTED
from agent.catalogue import MEASUREMENTS
def test_cov():
    got = {(s.measurement, f) for s in EMITTED for f in s.fields}
    want = {("ups", f) for f in MEASUREMENTS["ups"].fields} | {("agent", f) for f in MEASUREMENTS["agent"].fields}
    print("MISSING", sorted(want - got))
    assert not (want - got)
