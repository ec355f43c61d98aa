from __future__ import annotations

import pytest

from micro.auth import Account
from micro.errors import Forbidden, Unauthorized
from micro_daemon.auth.namespaces import authorize, authorize_admin

MICRO_ADMIN = Account("root", "user", "micro", ("admin",))
MICRO_SERVICE = Account("store", "service", "micro", ("service",))
MICRO_USER = Account("joe", "user", "micro", ())
MICRO_CLIENT_ADMIN = Account("app", "client", "micro", ("admin",))
NS_ADMIN = Account("boss", "user", "ns", ("admin",))
NS_SERVICE = Account("svc", "service", "ns", ("service",))
NS_USER = Account("ann", "user", "ns", ("dev",))
NS_CLIENT = Account("app", "client", "ns", ("admin",))
NS_SERVICE_WITHOUT_SCOPE = Account("svc", "service", "ns", ())
OTHER_ADMIN = Account("boss", "user", "other", ("admin",))

# account -> (authorize in 'ns', authorize_admin in 'ns'): None when allowed, else the error
CASES = {
    "anonymous": (None, Unauthorized, Unauthorized),
    "micro admin": (MICRO_ADMIN, None, None),
    "micro service": (MICRO_SERVICE, None, None),
    "micro user": (MICRO_USER, Forbidden, Forbidden),
    "micro client with admin scope": (MICRO_CLIENT_ADMIN, Forbidden, Forbidden),
    "namespace admin": (NS_ADMIN, None, None),
    "namespace service": (NS_SERVICE, None, None),
    "namespace user": (NS_USER, None, Forbidden),
    "namespace service without scope": (NS_SERVICE_WITHOUT_SCOPE, None, Forbidden),
    "namespace client": (NS_CLIENT, Forbidden, Forbidden),
    "admin of another namespace": (OTHER_ADMIN, Forbidden, Forbidden),
}


@pytest.mark.parametrize(("account", "member", "admin"), CASES.values(), ids=CASES.keys())
def test_namespace_authorization(account, member, admin):
    for check, expected in ((authorize, member), (authorize_admin, admin)):
        if expected is None:
            assert check(account, "ns") is account
        else:
            with pytest.raises(expected) as info:
                check(account, "ns")
            assert info.value.id == "auth"


def test_an_admin_of_a_namespace_administers_it_and_micro_admins_every_one():
    assert authorize_admin(OTHER_ADMIN, "other") is OTHER_ADMIN
    assert authorize_admin(MICRO_ADMIN, "micro") is MICRO_ADMIN
    assert authorize_admin(MICRO_ADMIN, "other") is MICRO_ADMIN
    with pytest.raises(Forbidden, match="of namespace 'ns' may not use namespace 'micro'"):
        authorize(NS_ADMIN, "micro")
