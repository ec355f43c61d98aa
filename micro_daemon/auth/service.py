"""The auth service: ``micro.auth.v1.Auth``, ``Accounts`` and ``Rules`` over an ``AuthEngine``.

A request acts on ``options.namespace``, or on the caller's namespace when
that is empty. Who may call what (Micro v3):

* ``Auth.Token`` and ``Auth.Inspect``: anyone;
* ``Auth.Generate``, ``Accounts.List``, ``Accounts.Delete`` and every
  ``Rules`` method: an administrator of the namespace (``authorize_admin``);
* ``Accounts.ChangeSecret``: the account itself, with its old secret, or an
  administrator of the namespace, without.

The caller is the account of the ``authorization: Bearer <token>`` metadata.
Failed secrets are rate limited per address too: the address is the
``micro-remote-address`` metadata, which the server sets from the peer it
sees (whatever a caller sends under that key must be overwritten there).
"""

from __future__ import annotations

from micro.auth import Account
from micro.context import Context, validate_namespace
from micro.errors import BadRequest, Forbidden
from micro.proto import auth_pb2
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.namespaces import authorize, authorize_admin, is_admin
from micro_daemon.auth.rules import Access, Resource, Rule

__all__ = ["ADDRESS_KEY", "AccountsHandler", "AuthHandler", "RulesHandler"]

ADDRESS_KEY = "micro-remote-address"


class AuthHandler:
    """Serves ``micro.auth.v1.Auth``."""

    def __init__(self, engine: AuthEngine) -> None:
        self.engine = engine

    async def Generate(
        self, request: auth_pb2.GenerateRequest, context: Context
    ) -> auth_pb2.GenerateResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        account, secret = await self.engine.generate(
            namespace,
            request.id,
            type=request.type,
            scopes=request.scopes,
            metadata=request.metadata,
            secret=request.secret,
            name=request.name,
        )
        return auth_pb2.GenerateResponse(account=_account(account, secret=secret))

    async def Inspect(self, request: auth_pb2.InspectRequest, context: Context) -> auth_pb2.InspectResponse:
        if not request.token:
            raise BadRequest("token is empty: give the access token to inspect", id="auth")
        return auth_pb2.InspectResponse(account=_account(await self.engine.inspect(request.token)))

    async def Token(self, request: auth_pb2.TokenRequest, context: Context) -> auth_pb2.TokenResponse:
        token = await self.engine.token(
            _namespace(request.options, context),
            id=request.id,
            secret=request.secret,
            refresh_token=request.refresh_token,
            lifetime=request.token_expiry,
            address=context.metadata.get(ADDRESS_KEY, ""),
        )
        return auth_pb2.TokenResponse(
            token=auth_pb2.Token(
                access_token=token.access_token,
                refresh_token=token.refresh_token,
                created=int(token.created),
                expiry=int(token.expiry),
            )
        )


class AccountsHandler:
    """Serves ``micro.auth.v1.Accounts``."""

    def __init__(self, engine: AuthEngine) -> None:
        self.engine = engine

    async def List(
        self, request: auth_pb2.ListAccountsRequest, context: Context
    ) -> auth_pb2.ListAccountsResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        accounts = await self.engine.list_accounts(namespace)
        return auth_pb2.ListAccountsResponse(accounts=[_account(a) for a in accounts])

    async def Delete(
        self, request: auth_pb2.DeleteAccountRequest, context: Context
    ) -> auth_pb2.DeleteAccountResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        await self.engine.delete_account(namespace, _required(request.id, "id"))
        return auth_pb2.DeleteAccountResponse()

    async def ChangeSecret(
        self, request: auth_pb2.ChangeSecretRequest, context: Context
    ) -> auth_pb2.ChangeSecretResponse:
        namespace = _namespace(request.options, context)
        caller = authorize(await self.engine.caller(context), namespace)
        admin = is_admin(caller)
        if not admin and (caller.id, caller.issuer) != (request.id, namespace):
            raise Forbidden(
                f"account {caller.id!r} may change its own secret only, not that of {request.id!r}", id="auth"
            )
        if not admin and not request.old_secret:
            raise BadRequest("old_secret is empty: give the current secret to change it", id="auth")
        await self.engine.change_secret(
            namespace,
            _required(request.id, "id"),
            request.new_secret,
            old_secret=None if admin else request.old_secret,
            address=context.metadata.get(ADDRESS_KEY, ""),
        )
        return auth_pb2.ChangeSecretResponse()


class RulesHandler:
    """Serves ``micro.auth.v1.Rules``."""

    def __init__(self, engine: AuthEngine) -> None:
        self.engine = engine

    async def Create(
        self, request: auth_pb2.CreateRuleRequest, context: Context
    ) -> auth_pb2.CreateRuleResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        await self.engine.rules.create(namespace, _rule(request.rule))
        return auth_pb2.CreateRuleResponse()

    async def Delete(
        self, request: auth_pb2.DeleteRuleRequest, context: Context
    ) -> auth_pb2.DeleteRuleResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        await self.engine.rules.delete(namespace, _required(request.id, "id"))
        return auth_pb2.DeleteRuleResponse()

    async def List(self, request: auth_pb2.ListRulesRequest, context: Context) -> auth_pb2.ListRulesResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        rules = await self.engine.rules.list(namespace)
        return auth_pb2.ListRulesResponse(rules=[_rule_proto(r) for r in rules])

    async def Verify(self, request: auth_pb2.VerifyRequest, context: Context) -> auth_pb2.VerifyResponse:
        namespace = _namespace(request.options, context)
        authorize_admin(await self.engine.caller(context), namespace)
        account = await self.engine.account(namespace, request.account_id) if request.account_id else None
        decision = await self.engine.verify_access(namespace, _resource(request.resource), account)
        return auth_pb2.VerifyResponse(
            granted=decision.granted,
            rule=_rule_proto(decision.rule) if decision.rule else None,
            reason=decision.reason,
        )


def _namespace(options: auth_pb2.Options, context: Context) -> str:
    return validate_namespace(options.namespace) if options.namespace else context.namespace


def _required(value: str, field: str) -> str:
    if not value:
        raise BadRequest(f"{field} is empty", id="auth")
    return value


def _account(account: Account, *, secret: str = "") -> auth_pb2.Account:
    return auth_pb2.Account(
        id=account.id,
        type=account.type,
        metadata=dict(account.metadata),
        scopes=list(account.scopes),
        issuer=account.issuer,
        secret=secret,
        name=account.name,
    )


def _resource(resource: auth_pb2.Resource) -> Resource:
    return Resource(resource.type, resource.name, resource.endpoint).check()


def _rule(rule: auth_pb2.Rule) -> Rule:
    if rule.access not in (auth_pb2.GRANTED, auth_pb2.DENIED):
        raise BadRequest("rule access must be GRANTED or DENIED", id="auth")
    access = Access.GRANTED if rule.access == auth_pb2.GRANTED else Access.DENIED
    return Rule(rule.id, rule.scope, _resource(rule.resource), access, rule.priority).check()


def _rule_proto(rule: Rule) -> auth_pb2.Rule:
    resource = auth_pb2.Resource(
        type=rule.resource.type, name=rule.resource.name, endpoint=rule.resource.endpoint
    )
    access = auth_pb2.GRANTED if rule.access is Access.GRANTED else auth_pb2.DENIED
    return auth_pb2.Rule(
        id=rule.id, scope=rule.scope, resource=resource, access=access, priority=rule.priority
    )
