"""Every registered accountant passes the contract suite."""

from .accountant_contract import AccountantContract

from fedmm_secure.privacy.accountant import available_accountants


class TestPLDContract(AccountantContract):
    name = "pld"


class TestRDPContract(AccountantContract):
    name = "rdp"


def test_every_registered_accountant_has_a_contract_class():
    covered = {c.name for c in (TestPLDContract, TestRDPContract)}
    assert set(available_accountants()) <= covered | {"_test_dummy"}
