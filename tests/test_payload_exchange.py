"""The step's tokens reach each rank point to point (exchange.py), not by an all-gather of the
whole batch: 4 ranks under torchrun, six layouts, padded / packed / token-budget micro-batches
equal to the old all-gathered path's on every rank, each rank receiving exactly the sequences its
data-parallel replica trains on (tests/dist/payload_exchange.py)."""
import pytest

from torchrun import ROOT, torchrun

pytestmark = pytest.mark.slow


def test_payload_exchange_four_ranks():
    out = torchrun(ROOT / "tests/dist/payload_exchange.py", 4, timeout=600)
    assert "PAYLOAD_EXCHANGE_OK" in out, out[-4000:]
    print("\n".join(line for line in out.splitlines() if "old all-gather" in line))
