"""``micro auth``: accounts, access rules and tokens of the current namespace."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro_cli.output import Output, print_fields, print_json, print_table
from micro_cli.session import connect, run, target

if TYPE_CHECKING:
    from micro.auth import AuthClient
    from micro.client import Client
    from micro.proto import auth_pb2

__all__ = ["app"]

app = typer.Typer(help="Manage accounts, access rules and tokens.", no_args_is_help=True)
list_app = typer.Typer(help="List accounts or rules.", no_args_is_help=True)
create_app = typer.Typer(help="Create an account, a rule or a token.", no_args_is_help=True)
delete_app = typer.Typer(help="Delete an account or a rule.", no_args_is_help=True)
update_app = typer.Typer(help="Change an account.", no_args_is_help=True)
app.add_typer(list_app, name="list")
app.add_typer(create_app, name="create")
app.add_typer(delete_app, name="delete")
app.add_typer(update_app, name="update")

OutputOption = Annotated[Output | None, typer.Option("--output", help="table (human) or json.")]
Namespace = Annotated[
    str, typer.Option("--namespace", help="The account's namespace (default: the current one).")
]
PUBLIC = "<public>"


class Access(enum.StrEnum):
    """``--access`` of a rule."""

    granted = "granted"
    denied = "denied"


def _auth(client: Client) -> AuthClient:
    from micro.auth import AuthClient

    return AuthClient(client)


@list_app.command("accounts")
def list_accounts(output: OutputOption = None) -> None:
    """List the accounts of the current namespace (administrators only)."""

    async def go() -> list[auth_pb2.Account]:
        async with connect() as client:
            return await _auth(client).list()

    accounts = sorted(run(go()), key=lambda a: a.id)
    if output is Output.json:
        print_json([_account_json(a) for a in accounts])
        return
    rows = [
        [a.id, a.name or a.id, a.type, ", ".join(a.scopes) or "n/a", _pairs(a.metadata) or "n/a"]
        for a in accounts
    ]
    print_table(["ID", "NAME", "TYPE", "SCOPES", "METADATA"], rows)


@list_app.command("rules")
def list_rules(output: OutputOption = None) -> None:
    """List the access rules of the current namespace, highest priority first."""

    async def go() -> list[auth_pb2.Rule]:
        async with connect() as client:
            return await _auth(client).list_rules()

    rules = sorted(run(go()), key=lambda r: (-r.priority, r.id))
    if output is Output.json:
        print_json([_rule_json(r) for r in rules])
        return
    rows = [[r.id, r.scope or PUBLIC, _access(r), _resource(r.resource), r.priority] for r in rules]
    print_table(["ID", "SCOPE", "ACCESS", "RESOURCE", "PRIORITY"], rows)


@create_app.command("account")
def create_account(
    id: Annotated[str, typer.Argument(help="Account id.")],
    secret: Annotated[
        str, typer.Option("--secret", help="Its secret (default: a random one, shown once).")
    ] = "",
    scopes: Annotated[
        list[str] | None, typer.Option("--scopes", help="Scopes, comma-separated or repeated, e.g. admin.")
    ] = None,
    type: Annotated[str, typer.Option("--type", help="user, service or client.")] = "user",
    name: Annotated[str, typer.Option("--name", help="A name to sign in with (default: the id).")] = "",
    namespace: Namespace = "",
    output: OutputOption = None,
) -> None:
    """Create an account; its secret is printed this once if it was generated."""

    async def go() -> auth_pb2.Account:
        async with connect() as client:
            return await _auth(client).generate(
                id, secret=secret, type=type, scopes=_split(scopes), name=name, namespace=namespace
            )

    account = run(go())
    if output is Output.json:
        print_json({**_account_json(account), "secret": account.secret})
        return
    print(f"Account {account.id} created in namespace {account.issuer}")
    fields: list[tuple[str, Any]] = [("type", account.type), ("scopes", ", ".join(account.scopes) or "none")]
    if not secret:
        fields.append(("secret", f"{account.secret}  (shown only now)"))
    print_fields(fields)


@create_app.command("rule")
def create_rule(
    id: Annotated[str, typer.Argument(help="Rule id.")],
    resource: Annotated[
        str, typer.Option("--resource", help="type:name:endpoint, e.g. service:store:Store.Read or *:*:*.")
    ],
    scope: Annotated[
        str, typer.Option("--scope", help="'' public, '*' any account of the namespace, '+' any account.")
    ] = "",
    access: Annotated[Access, typer.Option("--access", help="Grant or deny.")] = Access.granted,
    priority: Annotated[int, typer.Option("--priority", help="Higher is looked at first.")] = 0,
) -> None:
    """Create (or replace) an access rule in the current namespace."""

    async def go() -> None:
        async with connect() as client:
            await _auth(client).create_rule(
                id,
                resource,
                scope=scope,
                access="granted" if access is Access.granted else "denied",
                priority=priority,
            )

    run(go())
    print(f"Rule {id} created: {access.value} {scope or PUBLIC} on {resource} (priority {priority})")


@create_app.command("token")
def create_token(
    id: Annotated[str, typer.Option("--id", help="Account id or name.")],
    secret: Annotated[
        str | None, typer.Option("--secret", help="Its secret (prompted, hidden, if not given).")
    ] = None,
    expiry: Annotated[
        str | None, typer.Option("--expiry", help="How long the access token lives: seconds, or 10m, 1h.")
    ] = None,
    namespace: Namespace = "",
    output: OutputOption = None,
) -> None:
    """Exchange an account's id and secret for an access token and a refresh token, and print them."""
    from micro_cli.durations import parse_duration
    from micro_cli.login import read_password

    lifetime = round(parse_duration(expiry, what="--expiry")) if expiry is not None else 0
    secret = read_password(secret, False, prompt="Secret")

    async def go() -> auth_pb2.Token:
        async with connect(anonymous=True) as client:
            return await _auth(client).token(id=id, secret=secret, expiry=lifetime, namespace=namespace)

    token = run(go())
    if output is Output.json:
        print_json(
            {
                "access_token": token.access_token,
                "refresh_token": token.refresh_token,
                "created": token.created,
                "expiry": token.expiry,
            }
        )
        return
    print_fields(
        [
            ("access token", token.access_token),
            ("refresh token", token.refresh_token),
            ("expires", f"{_when(token.expiry)} (in {max(0, token.expiry - int(time.time()))}s)"),
        ]
    )


@delete_app.command("account")
def delete_account(id: Annotated[str, typer.Argument(help="Account id.")], namespace: Namespace = "") -> None:
    """Delete an account; its tokens stop working."""

    async def go() -> None:
        async with connect() as client:
            await _auth(client).delete(id, namespace=namespace)

    run(go())
    print(f"Account {id} deleted")


@delete_app.command("rule")
def delete_rule(id: Annotated[str, typer.Argument(help="Rule id.")]) -> None:
    """Delete an access rule of the current namespace."""

    async def go() -> None:
        async with connect() as client:
            await _auth(client).delete_rule(id)

    run(go())
    print(f"Rule {id} deleted")


@update_app.command("secret")
def update_secret(
    id: Annotated[str, typer.Argument(help="Account id.")],
    secret: Annotated[
        str | None, typer.Option("--secret", help="The new secret (prompted twice, hidden, if not given).")
    ] = None,
    old_secret: Annotated[
        str, typer.Option("--old-secret", help="The current secret (not needed by an administrator).")
    ] = "",
    namespace: Namespace = "",
) -> None:
    """Set an account's secret; its tokens stop working."""
    from micro_cli.login import read_password

    new = read_password(secret, False, prompt="New secret", confirm=True)

    async def go() -> None:
        async with connect() as client:
            await _auth(client).change_secret(id, new, old_secret=old_secret, namespace=namespace)

    run(go())
    print(f"Secret of {id} changed; its tokens no longer work")


@app.command("check")
def check(
    resource: Annotated[
        str, typer.Option("--resource", help="type:name:endpoint, e.g. service:store:Store.Read.")
    ],
    account: Annotated[
        str, typer.Option("--account", help="Account id (default: an anonymous caller).")
    ] = "",
    output: OutputOption = None,
) -> None:
    """Say whether an account may access a resource in the current namespace, and which rule decided."""
    _, namespace = target()

    async def go() -> auth_pb2.VerifyResponse:
        async with connect() as client:
            return await _auth(client).verify(resource, account_id=account)

    decision = run(go())
    decided = decision.rule if decision.HasField("rule") and decision.rule.id else None
    if output is Output.json:
        print_json(
            {
                "granted": decision.granted,
                "account": account,
                "resource": resource,
                "namespace": namespace,
                "rule": _rule_json(decided) if decided is not None else None,
                "reason": decision.reason,
            }
        )
        return
    who = f"account {account}" if account else "an anonymous caller"
    print(f"{'granted' if decision.granted else 'denied'}: {who} on {resource} in namespace {namespace}")
    rule = (
        f"{decided.id} ({_access(decided)} {decided.scope or PUBLIC} on {_resource(decided.resource)}, "
        f"priority {decided.priority})"
        if decided is not None
        else "none matched"
    )
    print_fields([("rule", rule), ("reason", decision.reason or "n/a")])


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _pairs(metadata: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(metadata.items()))


def _access(rule: auth_pb2.Rule) -> str:
    from micro.proto import auth_pb2

    return {auth_pb2.GRANTED: "granted", auth_pb2.DENIED: "denied"}.get(rule.access, "unknown")


def _resource(resource: auth_pb2.Resource) -> str:
    return f"{resource.type}:{resource.name}:{resource.endpoint}"


def _account_json(account: auth_pb2.Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "name": account.name,
        "type": account.type,
        "namespace": account.issuer,
        "scopes": list(account.scopes),
        "metadata": dict(account.metadata),
    }


def _rule_json(rule: auth_pb2.Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "scope": rule.scope,
        "access": _access(rule),
        "resource": _resource(rule.resource),
        "priority": rule.priority,
    }


def _when(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(unix))
